//! `crypt(DISK, key=@KEYFILE)` or `crypt(DISK, key=hex:HEX)`.

use crate::CryptDisk;
use disk_backend::Disk;
use disk_backend::resolve::{Args, ResolveContext, ResolveDisk, ResolveError};
use zeroize::Zeroizing;

/// The XTS-AES-256 key length in bytes.
const KEY_BYTES: usize = 64;

/// Opens `crypt` nodes: XTS-AES-256 over a disk. The 64-byte key comes from a file of
/// exactly 64 bytes (`key=@path`, like a dm-crypt key file) or from 128 hex digits
/// (`key=hex:...`, for tests; a key on a command line is visible to other users).
#[derive(Debug, Clone, Copy, Default)]
pub struct CryptResolver;

fn read_key(ctx: &ResolveContext<'_>, key: &str) -> Result<Zeroizing<Vec<u8>>, ResolveError> {
    let bytes = if let Some(path) = key.strip_prefix('@') {
        let data = read_key_file(path)
            .map_err(|e| ctx.error_with(format!("cannot read the key file {path}"), e))?;
        match data {
            KeyFile::Key(key) => key,
            KeyFile::Length(len) => {
                return Err(ctx.error(format!(
                    "the key file {path} holds {len} bytes; XTS-AES-256 needs exactly {KEY_BYTES}"
                )));
            }
            KeyFile::TooLong => {
                return Err(ctx.error(format!(
                    "the key file {path} holds more than {KEY_BYTES} bytes; XTS-AES-256 needs \
                     exactly {KEY_BYTES}"
                )));
            }
        }
    } else if let Some(hex) = key.strip_prefix("hex:") {
        if hex.len() != 2 * KEY_BYTES || !hex.is_ascii() {
            return Err(ctx.error(format!("a hex key is {} hex digits", 2 * KEY_BYTES)));
        }
        let mut data = Zeroizing::new(Vec::with_capacity(KEY_BYTES));
        for pair in hex.as_bytes().chunks(2) {
            let digits = std::str::from_utf8(pair).expect("ascii");
            data.push(
                u8::from_str_radix(digits, 16)
                    .map_err(|_| ctx.error(format!("`{digits}` is not a hex byte")))?,
            );
        }
        data
    } else {
        return Err(ctx.error("`key` must be `@KEYFILE` or `hex:HEX`"));
    };
    Ok(bytes)
}

/// What a key file holds.
enum KeyFile {
    /// Exactly a key.
    Key(Zeroizing<Vec<u8>>),
    /// Fewer bytes than a key.
    Length(usize),
    /// More bytes than a key (not all read).
    TooLong,
}

/// Reads a key file: a regular file (anything else, a FIFO or `/dev/zero`, is refused at
/// once) of which at most one byte more than a key is read, into memory that is zeroed
/// when dropped and never reallocated (a growing buffer would leave copies of the key in
/// freed memory).
fn read_key_file(path: &str) -> Result<KeyFile, std::io::Error> {
    use std::io::Read;
    let mut file = disk_backend::host_file::open_regular_file(path.as_ref(), false)
        .map_err(disk_backend::host_file::OpenHostFileError::into_io_error)?;
    let mut buffer = Zeroizing::new([0u8; KEY_BYTES + 1]);
    let mut len = 0;
    while len < buffer.len() {
        match file.read(&mut buffer[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(match len {
        KEY_BYTES => KeyFile::Key(Zeroizing::new(buffer[..KEY_BYTES].to_vec())),
        n if n > KEY_BYTES => KeyFile::TooLong,
        n => KeyFile::Length(n),
    })
}

impl ResolveDisk for CryptResolver {
    fn kind(&self) -> &str {
        "crypt"
    }

    fn usage(&self) -> &str {
        "crypt(DISK, key=@KEYFILE | key=hex:HEX): XTS-AES-256 (aes-xts-plain64), 64-byte key"
    }

    fn resolve(&self, ctx: &ResolveContext<'_>, args: &Args<'_>) -> Result<Disk, ResolveError> {
        let key = args
            .named_text(ctx, "key")?
            .ok_or_else(|| ctx.error("missing `key`"))?;
        let mut disks = args.disks();
        args.finish(ctx)?;
        let (index, inner) = match disks.len() {
            1 => disks.pop().expect("one disk"),
            n => return Err(ctx.error(format!("takes exactly one disk, not {n}"))),
        };
        // Check the key before opening anything below.
        let key = read_key(ctx, key)?;
        let inner = ctx.resolve_child(index, &inner)?;
        let crypt = CryptDisk::new(inner, &key).map_err(|e| ctx.error_with("invalid key", e))?;
        Disk::new(crypt).map_err(|e| ctx.error_with("invalid geometry", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk_backend::resolve::Resolver;

    fn resolve(spec: &str) -> Result<Disk, String> {
        let mut resolver = Resolver::new();
        resolver
            .register(CryptResolver)
            .register(disk_ram::RamResolver);
        resolver
            .resolve(&spec.parse().unwrap())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn keys_from_files_and_hex() {
        let dir = tempfile::tempdir().unwrap();
        let key: Vec<u8> = (0..64).collect();
        let path = dir.path().join("k");
        std::fs::write(&path, &key).unwrap();
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        let from_file = resolve(&format!("crypt(ram(size=64k), key=@{})", path.display())).unwrap();
        let from_hex = resolve(&format!("crypt(ram(size=64k), key=hex:{hex})")).unwrap();
        assert_eq!(from_file.sector_count(), 128);
        assert_eq!(from_hex.sector_count(), 128);
        for (spec, error) in [
            (
                format!("crypt(ram, key=@{}/missing)", dir.path().display()),
                "cannot read the key file",
            ),
            (
                format!("crypt(ram, key=hex:{})", "zz".repeat(64)),
                "`zz` is not a hex byte",
            ),
            (
                format!("crypt(ram, ram, key=hex:{hex})"),
                "takes exactly one disk, not 2",
            ),
            (
                format!("crypt(nothing, key=hex:{hex})"),
                "crypt/nothing[1]: unknown disk kind",
            ),
        ] {
            let err = resolve(&spec).unwrap_err();
            assert!(err.contains(error), "{spec}: {err}");
        }
    }
}
