//! XTS-AES-256 throughput on 4 KiB sectors, one core: our batched path, the `xts-mode`
//! reference path and OpenSSL's EVP `aes-256-xts` on the same buffer in the same process,
//! with the ratio to OpenSSL.
//!
//! `cargo xtask bench xts` runs it (`cargo bench -p disk_crypt --bench xts`). Without
//! `--bench` (as `cargo test --all-targets` runs it) it only checks that the three agree and
//! times one short round.
//!
//! OpenSSL gets its best case: the key is set once on a reused `EVP_CIPHER_CTX`, and each
//! sector only re-initialises the tweak (as dm-crypt's kernel implementation does).

#![allow(missing_docs)]

use aes::Aes256;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use disk_crypt::XtsAes256;
use openssl::cipher::Cipher;
use openssl::cipher_ctx::CipherCtx;
use std::hint::black_box;
use std::time::{Duration, Instant};

const SECTOR: usize = 4096;
/// 1 MiB: stays in L2, so the figures are about the cipher, not memory bandwidth.
const SECTORS: usize = 256;

struct OpenSsl {
    ctx: CipherCtx,
}

impl OpenSsl {
    fn new(key: &[u8], encrypt: bool) -> Self {
        let mut ctx = CipherCtx::new().unwrap();
        if encrypt {
            ctx.encrypt_init(Some(Cipher::aes_256_xts()), Some(key), None)
                .unwrap();
        } else {
            ctx.decrypt_init(Some(Cipher::aes_256_xts()), Some(key), None)
                .unwrap();
        }
        Self { ctx }
    }

    fn run(&mut self, encrypt: bool, sector: u64, data: &mut [u8]) {
        let iv = (sector as u128).to_le_bytes();
        if encrypt {
            self.ctx.encrypt_init(None, None, Some(&iv)).unwrap();
        } else {
            self.ctx.decrypt_init(None, None, Some(&iv)).unwrap();
        }
        let len = data.len();
        let written = self.ctx.cipher_update_inplace(data, len).unwrap();
        assert_eq!(written, len);
    }
}

/// Passes over `buffer`, sector by sector, for at least `duration`; MiB/s.
fn throughput(buffer: &mut [u8], duration: Duration, mut f: impl FnMut(u64, &mut [u8])) -> f64 {
    let start = Instant::now();
    let mut bytes = 0usize;
    while start.elapsed() < duration {
        for (i, sector) in buffer.chunks_exact_mut(SECTOR).enumerate() {
            f(black_box(1000 + i as u64), black_box(sector));
        }
        bytes += buffer.len();
    }
    bytes as f64 / start.elapsed().as_secs_f64() / (1024.0 * 1024.0)
}

fn main() {
    let bench = std::env::args().any(|arg| arg == "--bench");
    let (rounds, duration) = if bench {
        (7, Duration::from_millis(400))
    } else {
        (1, Duration::from_millis(10))
    };
    let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37) ^ 0x5c).collect();
    let ours = XtsAes256::new(&key).unwrap();
    let mut ssl_enc = OpenSsl::new(&key, true);
    let mut ssl_dec = OpenSsl::new(&key, false);

    let mut buffer: Vec<u8> = (0..SECTOR * SECTORS)
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();
    // The three must agree before their speeds mean anything.
    let mut a = buffer.clone();
    let mut b = buffer.clone();
    let mut c = buffer.clone();
    for (i, ((a, b), c)) in a
        .chunks_exact_mut(SECTOR)
        .zip(b.chunks_exact_mut(SECTOR))
        .zip(c.chunks_exact_mut(SECTOR))
        .enumerate()
    {
        ours.encrypt_sector(i as u64, a).unwrap();
        ours.encrypt_sector_reference(i as u64, b).unwrap();
        ssl_enc.run(true, i as u64, c);
    }
    assert!(a == b && a == c, "implementations disagree");

    // Interleaved rounds, best of each, so that noise from other work on the machine hits
    // every implementation alike.
    // Plain AES over the same bytes, no tweak: the ceiling of the `aes` crate on this CPU.
    let ecb = Aes256::new_from_slice(&key[..32]).unwrap();
    let mut ecb_blocks = vec![aes::Block::default(); SECTOR / 16];
    let names = [
        "ours (batched aes)",
        "xts-mode reference",
        "openssl EVP",
        "aes crate ECB (ceiling)",
    ];
    let mut best = [[0f64; 2]; 4];
    for _ in 0..rounds {
        for (direction, encrypt) in [true, false].into_iter().enumerate() {
            let results = [
                throughput(&mut buffer, duration, |s, d| {
                    if encrypt {
                        ours.encrypt_sector(s, d).unwrap()
                    } else {
                        ours.decrypt_sector(s, d).unwrap()
                    }
                }),
                throughput(&mut buffer, duration, |s, d| {
                    if encrypt {
                        ours.encrypt_sector_reference(s, d).unwrap()
                    } else {
                        ours.decrypt_sector_reference(s, d).unwrap()
                    }
                }),
                throughput(&mut buffer, duration, |s, d| {
                    if encrypt {
                        ssl_enc.run(true, s, d)
                    } else {
                        ssl_dec.run(false, s, d)
                    }
                }),
                throughput(&mut buffer, duration, |_, d| {
                    for (block, bytes) in ecb_blocks.iter_mut().zip(d.as_chunks::<16>().0) {
                        block.copy_from_slice(bytes);
                    }
                    if encrypt {
                        ecb.encrypt_blocks(&mut ecb_blocks);
                    } else {
                        ecb.decrypt_blocks(&mut ecb_blocks);
                    }
                    for (block, bytes) in ecb_blocks.iter().zip(d.as_chunks_mut::<16>().0) {
                        bytes.copy_from_slice(block);
                    }
                }),
            ];
            for (slot, result) in best.iter_mut().zip(results) {
                slot[direction] = slot[direction].max(result);
            }
        }
    }

    if !bench {
        println!("test mode: the three implementations agree; run with --bench to measure");
    }
    println!(
        "xts-aes-256, {SECTOR}-byte sectors, one core, {} MiB buffer, best of {rounds} x {duration:?}",
        (SECTOR * SECTORS) >> 20
    );
    println!("{:<26} {:>14} {:>14}", "", "encrypt MiB/s", "decrypt MiB/s");
    for (name, [enc, dec]) in names.iter().zip(best) {
        println!("{name:<26} {enc:>14.0} {dec:>14.0}");
    }
    for (i, name) in [
        (0, "ratio ours / openssl"),
        (1, "ratio xts-mode / openssl"),
        (3, "ratio ECB / openssl"),
    ] {
        println!(
            "{name:<26} {:>14.2} {:>14.2}",
            best[i][0] / best[2][0],
            best[i][1] / best[2][1]
        );
    }
}
