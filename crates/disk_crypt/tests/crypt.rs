//! `CryptDisk`: IEEE 1619 known answers, interoperability with OpenSSL through a file, no
//! plaintext on the backing file, the conformance suite and model, and what is forwarded.

use disk_backend::pr::{
    PersistentReservation, ReservationCapabilities, ReservationReport, ReservationType,
};
use disk_backend::{Disk, DiskError, DiskIo, UnmapBehavior};
use disk_crypt::{CryptDisk, InvalidKey, XtsAes256};
use disk_file::{FileDisk, FileDiskOptions};
use disk_ram::RamDisk;
use futures::FutureExt;
use futures::executor::block_on;
use openssl::symm::{Cipher, decrypt, encrypt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use request_buffers::{OwnedRequestBuffers, RequestBuffers};
use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;

/// A fixed test key (its halves differ).
fn key() -> Vec<u8> {
    (0..64u8).map(|i| i.wrapping_mul(29) ^ 0xa7).collect()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// IEEE 1619 vectors 10 to 14 as `(data unit sequence number, ciphertext)`.
fn ieee_vectors() -> Vec<(u64, Vec<u8>)> {
    let text = include_str!("ieee1619_xts_aes256.txt");
    let mut vectors: Vec<(u64, String)> = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        if line.is_empty() {
            continue;
        }
        if line.len() <= 16 {
            vectors.push((u64::from_str_radix(line, 16).unwrap(), String::new()));
        } else {
            vectors.last_mut().unwrap().1.push_str(line);
        }
    }
    vectors.into_iter().map(|(s, c)| (s, hex(&c))).collect()
}

fn ieee_key() -> Vec<u8> {
    hex(concat!(
        "2718281828459045235360287471352662497757247093699959574966967627",
        "3141592653589793238462643383279502884197169399375105820974944592"
    ))
}

fn ieee_plaintext() -> Vec<u8> {
    (0..512).map(|i| i as u8).collect()
}

#[test]
fn ieee_1619_known_answers() {
    let vectors = ieee_vectors();
    assert_eq!(vectors.len(), 5);
    let key = ieee_key();
    let plain = ieee_plaintext();
    let xts = XtsAes256::new(&key).unwrap();
    for (sector, cipher) in &vectors {
        assert_eq!(cipher.len(), 512);
        let mut fast = plain.clone();
        xts.encrypt_sector(*sector, &mut fast).unwrap();
        assert!(fast == *cipher, "fast path, vector at {sector:#x}");
        xts.decrypt_sector(*sector, &mut fast).unwrap();
        assert!(fast == plain);
        let mut reference = plain.clone();
        xts.encrypt_sector_reference(*sector, &mut reference)
            .unwrap();
        assert!(reference == *cipher, "xts-mode, vector at {sector:#x}");
        let iv = (*sector as u128).to_le_bytes();
        let ssl = encrypt(Cipher::aes_256_xts(), &key, Some(&iv), &plain).unwrap();
        assert!(ssl == *cipher, "openssl, vector at {sector:#x}");
    }
}

/// The vectors through the disk: the plaintext written at sector `n` of a 512-byte-sector
/// disk is the vector's ciphertext on the inner disk, so the tweak is the sector number.
#[test]
fn ieee_1619_known_answers_through_the_disk() {
    let inner = Disk::new(RamDisk::new(1 << 41, 512).unwrap()).unwrap();
    let disk = Disk::new(CryptDisk::new(inner.clone(), &ieee_key()).unwrap()).unwrap();
    let plain = OwnedRequestBuffers::from_slice(&ieee_plaintext());
    for (sector, cipher) in ieee_vectors() {
        let raw = OwnedRequestBuffers::new(512);
        let back = OwnedRequestBuffers::new(512);
        block_on(async {
            disk.write_vectored(&plain.buffers(false), sector, false)
                .await
                .unwrap();
            inner
                .read_vectored(&raw.buffers(true), sector)
                .await
                .unwrap();
            disk.read_vectored(&back.buffers(true), sector)
                .await
                .unwrap();
        });
        assert!(raw.to_vec() == cipher, "ciphertext at sector {sector:#x}");
        assert!(back.to_vec() == ieee_plaintext());
    }
}

/// A temporary file of `sectors` sectors and a `CryptDisk` over a `FileDisk` on it.
fn crypt_file(sectors: u64, sector_size: u32, key: &[u8]) -> (std::fs::File, Disk) {
    let file = tempfile::tempfile().unwrap();
    file.set_len(sectors * sector_size as u64).unwrap();
    let options = FileDiskOptions {
        read_only: false,
        sector_size,
        ..Default::default()
    };
    let inner = FileDisk::from_file(file.try_clone().unwrap(), &options).unwrap();
    let disk = CryptDisk::new(Disk::new(inner).unwrap(), key).unwrap();
    (file, Disk::new(disk).unwrap())
}

fn read_file(file: &mut std::fs::File) -> Vec<u8> {
    let mut raw = Vec::new();
    file.seek(SeekFrom::Start(0)).unwrap();
    file.read_to_end(&mut raw).unwrap();
    raw
}

/// What `CryptDisk` writes decrypts with OpenSSL's `aes-256-xts`, sector by sector with the
/// plain64 tweak, and what OpenSSL encrypts into the file reads back as plaintext.
#[test]
fn openssl_interoperability_through_a_file() {
    let key = key();
    for sector_size in [512u32, 4096] {
        let ss = sector_size as usize;
        let sectors = 64u64;
        let (mut file, disk) = crypt_file(sectors, sector_size, &key);
        let mut rng = StdRng::seed_from_u64(sector_size as u64);
        let mut plain = vec![0u8; sectors as usize * ss];
        rng.fill(&mut plain[..]);
        // Written in uneven requests through scattered buffers.
        let mut sector = 0u64;
        while sector < sectors {
            let n = rng.random_range(1..=7).min(sectors - sector);
            let range = sector as usize * ss..(sector + n) as usize * ss;
            let buf = OwnedRequestBuffers::scattered(range.len(), rng.random_range(0..4096));
            buf.copy_from_slice(&plain[range]);
            block_on(disk.write_vectored(&buf.buffers(false), sector, rng.random())).unwrap();
            sector += n;
        }
        block_on(disk.sync_cache()).unwrap();
        let raw = read_file(&mut file);
        for (s, cipher) in raw.chunks_exact(ss).enumerate() {
            let iv = (s as u128).to_le_bytes();
            let decrypted = decrypt(Cipher::aes_256_xts(), &key, Some(&iv), cipher).unwrap();
            assert!(
                decrypted == plain[s * ss..][..ss],
                "openssl decrypts sector {s} ({sector_size}-byte sectors)"
            );
        }

        // The other way: OpenSSL encrypts sectors 10..20 straight into the file.
        let fresh: Vec<u8> = (0..10 * ss).map(|i| (i * 13 + 5) as u8).collect();
        for (i, data) in fresh.chunks_exact(ss).enumerate() {
            let s = 10 + i as u64;
            let iv = (s as u128).to_le_bytes();
            let cipher = encrypt(Cipher::aes_256_xts(), &key, Some(&iv), data).unwrap();
            file.seek(SeekFrom::Start(s * sector_size as u64)).unwrap();
            file.write_all(&cipher).unwrap();
        }
        file.sync_all().unwrap();
        let back = OwnedRequestBuffers::scattered(12 * ss, 7);
        block_on(disk.read_vectored(&back.buffers(true), 9)).unwrap();
        let back = back.to_vec();
        assert!(back[..ss] == plain[9 * ss..10 * ss], "sector 9 untouched");
        assert!(
            back[ss..11 * ss] == fresh[..],
            "openssl's sectors read back"
        );
        assert!(
            back[11 * ss..] == plain[20 * ss..21 * ss],
            "sector 20 untouched"
        );
    }
}

/// No 16-byte block of anything written, however repetitive, appears anywhere in the file.
#[test]
fn no_plaintext_reaches_the_file() {
    let (mut file, disk) = crypt_file(256, 512, &key());
    let mut plain_blocks: HashSet<[u8; 16]> = HashSet::new();
    let mut written = Vec::new();
    let patterns: Vec<Vec<u8>> = vec![
        vec![0; 8 * 512],
        vec![b'A'; 4 * 512],
        disk_conformance::pattern(512, 0, 16, 0x11),
        (0..32 * 512).map(|i| (i % 251) as u8).collect(),
        b"secret!!".repeat(512),
    ];
    let mut sector = 0;
    for data in &patterns {
        let buf = OwnedRequestBuffers::from_slice(data);
        block_on(disk.write_vectored(&buf.buffers(false), sector, false)).unwrap();
        // The same plaintext at a second place: equal plaintext must not give equal ciphertext
        // at different sectors.
        block_on(disk.write_vectored(&buf.buffers(false), sector + 128, false)).unwrap();
        for block in data.as_chunks::<16>().0 {
            plain_blocks.insert(*block);
        }
        written.push((sector, data.len()));
        sector += (data.len() / 512) as u64;
    }
    block_on(disk.sync_cache()).unwrap();
    let raw = read_file(&mut file);
    for (i, block) in raw.as_chunks::<16>().0.iter().enumerate() {
        let offset = i * 16;
        let unwritten = !written.iter().any(|&(s, len)| {
            let start = s as usize * 512;
            (start..start + len).contains(&offset)
                || (start + 128 * 512..start + 128 * 512 + len).contains(&offset)
        });
        if unwritten {
            continue;
        }
        assert!(
            !plain_blocks.contains(block),
            "plaintext block found in the file at byte {offset}"
        );
    }
    let (first, second) = raw.split_at(128 * 512);
    assert!(first[..sector as usize * 512] != second[..sector as usize * 512]);
    // Ciphertext never repeats a 16-byte block within what was written.
    let mut seen = HashSet::new();
    for block in raw[..sector as usize * 512].as_chunks::<16>().0 {
        assert!(seen.insert(*block), "a ciphertext block repeats");
    }
}

fn ram_crypt(spec: &disk_conformance::DiskSpec, sector_size: u32) -> CryptDisk {
    let inner = RamDisk::new(spec.sector_count, sector_size)
        .unwrap()
        .with_read_only(spec.read_only);
    CryptDisk::new(Disk::new(inner).unwrap(), &key()).unwrap()
}

fn file_crypt(spec: &disk_conformance::DiskSpec, sector_size: u32) -> CryptDisk {
    let file = tempfile::tempfile().unwrap();
    file.set_len(spec.sector_count * sector_size as u64)
        .unwrap();
    let options = FileDiskOptions {
        read_only: spec.read_only,
        sector_size,
        ..Default::default()
    };
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
    let inner = FileDisk::open(path, &options).unwrap();
    CryptDisk::new(Disk::new(inner).unwrap(), &key()).unwrap()
}

// A fresh inner disk holds zeros, which decrypt to noise: the suite's "a fresh disk reads
// as zeros" check needs zeros on the *outer* disk, so the factories start from an inner
// disk whose sectors are the encryption of zeros.
fn zeroed(disk: CryptDisk) -> CryptDisk {
    if disk.is_read_only() {
        return disk;
    }
    let len = (disk.sector_count() * disk.sector_size() as u64) as usize;
    let zeros = OwnedRequestBuffers::new(len);
    block_on(disk.write_vectored(&zeros.buffers(false), 0, false)).unwrap();
    disk
}

disk_conformance::conformance_tests!(ram_512, |spec| zeroed(ram_crypt(spec, 512)));
disk_conformance::conformance_tests!(ram_4k, |spec| zeroed(ram_crypt(spec, 4096)));
disk_conformance::conformance_tests!(file_512, |spec| zeroed(file_crypt(spec, 512)));
disk_conformance::conformance_tests!(file_4k, |spec| zeroed(file_crypt(spec, 4096)));

/// The conformance model over several seeds and both sector sizes.
#[test]
fn random_model_over_seeds() {
    for seed in 0..6u64 {
        let sector_size = if seed % 2 == 0 { 512 } else { 4096 };
        let factory = |spec: &disk_conformance::DiskSpec| zeroed(ram_crypt(spec, sector_size));
        disk_conformance::model_with_seed(&factory, seed * 7919);
    }
}

#[test]
fn bad_keys_are_rejected() {
    let inner = || Disk::new(RamDisk::new(8, 512).unwrap()).unwrap();
    for len in [0, 16, 32, 48, 63, 65, 96] {
        assert_eq!(
            CryptDisk::new(inner(), &vec![3; len]).unwrap_err(),
            InvalidKey::Length(len)
        );
    }
    let mut key = [9u8; 64];
    assert_eq!(
        CryptDisk::new(inner(), &key).unwrap_err(),
        InvalidKey::EqualHalves
    );
    key[0] = 1;
    let disk = CryptDisk::new(inner(), &key).unwrap();
    assert!(
        !format!("{disk:?}").contains("9, 9"),
        "no key bytes in Debug"
    );
    let message = InvalidKey::EqualHalves.to_string();
    assert!(message.starts_with(char::is_lowercase) && !message.ends_with('.'));
}

/// Empty requests on a fresh bare disk (nothing pooled yet) succeed and touch nothing.
#[test]
fn empty_requests_on_a_fresh_disk() {
    let inner = Disk::new(RamDisk::new(8, 512).unwrap()).unwrap();
    let disk = CryptDisk::new(inner, &key()).unwrap();
    let empty = OwnedRequestBuffers::new(0);
    block_on(disk.read_vectored(&empty.buffers(true), 8)).unwrap();
    block_on(disk.write_vectored(&empty.buffers(false), 8, true)).unwrap();
    assert!(matches!(
        block_on(disk.read_vectored(&empty.buffers(true), 9)),
        Err(DiskError::IllegalBlock)
    ));
}

/// A write neither modifies the guest's buffer nor leaves plaintext on the inner disk; a
/// failed guest-memory read writes nothing.
#[test]
fn writes_leave_the_guest_buffer_alone() {
    let inner = Disk::new(RamDisk::new(64, 512).unwrap()).unwrap();
    let disk = Disk::new(CryptDisk::new(inner.clone(), &key()).unwrap()).unwrap();
    let data = disk_conformance::pattern(512, 0, 9, 3);
    let buf = OwnedRequestBuffers::scattered(data.len(), 300);
    buf.copy_from_slice(&data);
    block_on(disk.write_vectored(&buf.buffers(false), 5, true)).unwrap();
    assert!(buf.to_vec() == data, "the guest's buffer changed");

    // The second page of this request is not guest memory: nothing may be written.
    let mem = request_buffers::GuestMemory::allocate(4096);
    let gpns = [0, 77];
    let range = request_buffers::PagedRange::new(0, 8192, &gpns).unwrap();
    let before = OwnedRequestBuffers::new(16 * 512);
    block_on(inner.read_vectored(&before.buffers(true), 20)).unwrap();
    let result = block_on(disk.write_vectored(&RequestBuffers::new(&mem, range, false), 20, false));
    assert!(
        matches!(result, Err(DiskError::MemoryAccess(_))),
        "{result:?}"
    );
    let after = OwnedRequestBuffers::new(16 * 512);
    block_on(inner.read_vectored(&after.buffers(true), 20)).unwrap();
    assert!(before.to_vec() == after.to_vec());
}

/// An inner disk with reservations, eject, a disk id and a resizable size, to check what
/// `CryptDisk` forwards.
struct Inner {
    ram: Arc<RamDisk>,
    unmap_behavior: UnmapBehavior,
}

#[async_trait::async_trait]
impl PersistentReservation for Inner {
    fn capabilities(&self) -> ReservationCapabilities {
        ReservationCapabilities {
            exclusive_access: true,
            ..Default::default()
        }
    }
    async fn report(&self) -> Result<ReservationReport, DiskError> {
        Err(DiskError::ReservationConflict)
    }
    async fn register(&self, _: Option<u64>, _: u64, _: Option<bool>) -> Result<(), DiskError> {
        Ok(())
    }
    async fn reserve(&self, _: u64, _: ReservationType) -> Result<(), DiskError> {
        Ok(())
    }
    async fn release(&self, _: u64, _: ReservationType) -> Result<(), DiskError> {
        Ok(())
    }
    async fn clear(&self, _: u64) -> Result<(), DiskError> {
        Ok(())
    }
    async fn preempt(&self, _: u64, _: u64, _: ReservationType, _: bool) -> Result<(), DiskError> {
        Ok(())
    }
}

impl DiskIo for Inner {
    fn disk_type(&self) -> &str {
        "inner"
    }
    fn sector_count(&self) -> u64 {
        self.ram.sector_count()
    }
    fn sector_size(&self) -> u32 {
        512
    }
    fn disk_id(&self) -> Option<[u8; 16]> {
        Some([7; 16])
    }
    fn physical_sector_size(&self) -> u32 {
        4096
    }
    fn is_fua_respected(&self) -> bool {
        false
    }
    fn is_read_only(&self) -> bool {
        false
    }
    async fn read_vectored(&self, b: &RequestBuffers<'_>, s: u64) -> Result<(), DiskError> {
        self.ram.read_vectored(b, s).await
    }
    async fn write_vectored(
        &self,
        b: &RequestBuffers<'_>,
        s: u64,
        fua: bool,
    ) -> Result<(), DiskError> {
        self.ram.write_vectored(b, s, fua).await
    }
    async fn sync_cache(&self) -> Result<(), DiskError> {
        Err(DiskError::Io(std::io::Error::other(
            "flush reached the inner disk",
        )))
    }
    async fn unmap(&self, s: u64, n: u64, b: bool) -> Result<(), DiskError> {
        self.ram.unmap(s, n, b).await
    }
    fn unmap_behavior(&self) -> UnmapBehavior {
        self.unmap_behavior
    }
    fn optimal_unmap_sectors(&self) -> u32 {
        8
    }
    fn pr(&self) -> Option<&dyn PersistentReservation> {
        Some(self)
    }
    async fn eject(&self) -> Result<(), DiskError> {
        Ok(())
    }
    async fn wait_resize(&self, sector_count: u64) -> u64 {
        self.ram.wait_resize(sector_count).await
    }
}

#[test]
fn metadata_flush_pr_eject_and_resize_are_forwarded() {
    let ram = Arc::new(RamDisk::new(100, 512).unwrap());
    let inner = Inner {
        ram: ram.clone(),
        unmap_behavior: UnmapBehavior::Zeroes,
    };
    let disk = Disk::new(CryptDisk::new(Disk::new(inner).unwrap(), &key()).unwrap()).unwrap();
    assert_eq!(disk.disk_type(), "crypt");
    assert_eq!(disk.disk_id(), Some([7; 16]));
    assert_eq!(disk.physical_sector_size(), 4096);
    assert!(!disk.is_fua_respected());
    assert_eq!(disk.optimal_unmap_sectors(), 8);
    assert_eq!(disk.unmap_behavior(), UnmapBehavior::Unspecified);
    let pr = disk.pr().expect("reservations forwarded");
    assert!(pr.capabilities().exclusive_access);
    assert!(matches!(
        block_on(pr.report()),
        Err(DiskError::ReservationConflict)
    ));
    block_on(disk.eject()).expect("eject forwarded");
    let flush = block_on(disk.sync_cache()).unwrap_err();
    assert!(flush.to_string().contains("i/o"), "{flush}");

    assert!(disk.wait_resize(100).now_or_never().is_none());
    let waiter = std::thread::spawn({
        let disk = disk.clone();
        move || block_on(disk.wait_resize(100))
    });
    std::thread::sleep(std::time::Duration::from_millis(20));
    ram.resize(300).unwrap();
    assert_eq!(waiter.join().unwrap(), 300);
    assert_eq!(disk.sector_count(), 300);

    for behavior in [UnmapBehavior::Ignored, UnmapBehavior::Unspecified] {
        let inner = Inner {
            ram: ram.clone(),
            unmap_behavior: behavior,
        };
        let disk = CryptDisk::new(Disk::new(inner).unwrap(), &key()).unwrap();
        assert_eq!(disk.unmap_behavior(), behavior);
    }
}

/// Guest memory announced to the encrypted disk reaches the disk below (reads go straight
/// into guest memory there), and a refusal comes back.
#[test]
fn register_memory_is_forwarded() {
    let probe = Arc::new(disk_conformance::MemoryProbe::new(64));
    let disk =
        Disk::new(CryptDisk::new(Disk::new(probe.clone()).unwrap(), &key()).unwrap()).unwrap();
    let memory = request_buffers::GuestMemory::allocate(4096);
    disk.register_memory(&memory).unwrap();
    assert!(probe.last_is(&memory));
    probe.set_failing(true);
    assert!(disk.register_memory(&memory).is_err());
}
