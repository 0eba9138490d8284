//! Which kinds of disk diskctl knows, and opening a spec (or the built-in default).

use disk_backend::Disk;
use disk_backend::resolve::{DiskSpec, Resolver};
use disk_blockdevice::BlockDeviceResolver;
use disk_crypt::CryptResolver;
use disk_delay::DelayResolver;
use disk_file::FileResolver;
use disk_layered::LayeredResolver;
use disk_prwrap::PrWrapResolver;
use disk_qcow2::Qcow2Resolver;
use disk_ram::RamResolver;
use disk_striped::StripedResolver;

/// Size of the temporary file behind the built-in default disk.
pub const DEFAULT_FILE_BYTES: u64 = 256 << 20;

/// Every kind of disk this build can open.
pub fn resolver() -> Resolver {
    let mut resolver = Resolver::new();
    resolver
        .register(FileResolver)
        .register(RamResolver)
        .register(Qcow2Resolver)
        .register(
            LayeredResolver::new()
                .with_layer(RamResolver)
                .with_layer(Qcow2Resolver),
        )
        .register(PrWrapResolver)
        .register(StripedResolver)
        .register(CryptResolver)
        .register(DelayResolver)
        .register(BlockDeviceResolver);
    resolver
}

/// An opened stack: the disk, the spec it came from, and the temporary file behind the
/// built-in default (removed when this is dropped).
pub struct Stack {
    pub disk: Disk,
    pub spec: DiskSpec,
    _temp: Option<tempfile::NamedTempFile>,
}

/// Opens `spec`, or with `None` the built-in default: a 256 MiB temporary file.
pub fn open(spec: Option<&str>) -> Result<Stack, String> {
    let (spec, temp) = match spec {
        Some(text) => (text.parse::<DiskSpec>().map_err(|e| e.to_string())?, None),
        None => {
            let temp = tempfile::NamedTempFile::new()
                .map_err(|e| format!("cannot create a temporary file: {e}"))?;
            temp.as_file()
                .set_len(DEFAULT_FILE_BYTES)
                .map_err(|e| format!("cannot size the temporary file: {e}"))?;
            let path = temp.path().to_string_lossy().into_owned();
            (DiskSpec::new("file").arg(path), Some(temp))
        }
    };
    let disk = resolver().resolve(&spec).map_err(|e| error_chain(&e))?;
    Ok(Stack {
        disk,
        spec,
        _temp: temp,
    })
}

/// `error: cause: cause`, on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
