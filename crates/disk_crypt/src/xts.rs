//! XTS-AES-256 with a 128-bit little-endian sector number as tweak (dm-crypt's
//! `aes-xts-plain64`), batched through the `aes` crate's parallel block API.

use crate::error::{InvalidDataUnit, InvalidKey};
use aes::Aes256;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit, generic_array::GenericArray};
use xts_mode::Xts128;
use zeroize::ZeroizeOnDrop;

/// The AES block size in bytes.
const BLOCK: usize = 16;

/// Blocks handed to the AES backend per call: a multiple of its parallel batch (8 blocks
/// with AES-NI), enough to amortise its run-time feature dispatch, small enough (1 KiB of
/// blocks and tweaks) to stay in L1.
const BATCH_BLOCKS: usize = 32;

/// The XTS-AES-256 cipher of a [`CryptDisk`](crate::CryptDisk): a 64-byte key whose first
/// half encrypts the data and whose second half encrypts the tweak.
///
/// A data unit (a sector) of `n` 16-byte blocks at sector `s` is encrypted as
/// `C_j = E_K1(P_j ^ T_j) ^ T_j` with `T_0 = E_K2(s as u128, little-endian)` and
/// `T_{j+1} = T_j * alpha` in GF(2^128) (IEEE 1619). Data units are whole blocks, so there
/// is no ciphertext stealing.
///
/// [`encrypt_sector`](Self::encrypt_sector) and [`decrypt_sector`](Self::decrypt_sector)
/// are the fast path: the tweaks of a batch of blocks are computed first, then the batch
/// goes through AES in one call (AES-NI, 8 blocks in parallel, detected at run time). The
/// `_reference` methods run the same transform through the `xts-mode` crate, one block at
/// a time, as the reference the fast path is tested against.
///
/// The expanded keys are zeroed when the cipher is dropped (the `aes` crate's `zeroize`
/// feature); the caller's key bytes are never copied.
pub struct XtsAes256 {
    data: Aes256,
    tweak: Aes256,
    reference: Xts128<Aes256>,
}

/// Every field zeroes its key schedule on drop.
impl ZeroizeOnDrop for XtsAes256 {}

impl std::fmt::Debug for XtsAes256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("XtsAes256").finish_non_exhaustive()
    }
}

impl XtsAes256 {
    /// The key length in bytes: two AES-256 keys.
    pub const KEY_LEN: usize = 64;

    /// A cipher with `key` (64 bytes: the data key, then the tweak key). Fails on any other
    /// length and on a key whose two halves are equal (IEEE 1619-2018 forbids it: it turns
    /// XTS into a mode with known weaknesses).
    pub fn new(key: &[u8]) -> Result<Self, InvalidKey> {
        if key.len() != Self::KEY_LEN {
            return Err(InvalidKey::Length(key.len()));
        }
        let (data_key, tweak_key) = key.split_at(Self::KEY_LEN / 2);
        if data_key == tweak_key {
            return Err(InvalidKey::EqualHalves);
        }
        let data = Aes256::new(GenericArray::from_slice(data_key));
        let tweak = Aes256::new(GenericArray::from_slice(tweak_key));
        Ok(Self {
            reference: Xts128::new(data.clone(), tweak.clone()),
            data,
            tweak,
        })
    }

    /// Encrypts `data`, the sector `sector`, in place.
    pub fn encrypt_sector(&self, sector: u64, data: &mut [u8]) -> Result<(), InvalidDataUnit> {
        self.crypt(sector, data, true)
    }

    /// Decrypts `data`, the sector `sector`, in place.
    pub fn decrypt_sector(&self, sector: u64, data: &mut [u8]) -> Result<(), InvalidDataUnit> {
        self.crypt(sector, data, false)
    }

    /// [`encrypt_sector`](Self::encrypt_sector) through `xts-mode`, block by block.
    pub fn encrypt_sector_reference(
        &self,
        sector: u64,
        data: &mut [u8],
    ) -> Result<(), InvalidDataUnit> {
        check_data_unit(data)?;
        self.reference
            .encrypt_sector(data, xts_mode::get_tweak_default(sector as u128));
        Ok(())
    }

    /// [`decrypt_sector`](Self::decrypt_sector) through `xts-mode`, block by block.
    pub fn decrypt_sector_reference(
        &self,
        sector: u64,
        data: &mut [u8],
    ) -> Result<(), InvalidDataUnit> {
        check_data_unit(data)?;
        self.reference
            .decrypt_sector(data, xts_mode::get_tweak_default(sector as u128));
        Ok(())
    }

    fn crypt(&self, sector: u64, data: &mut [u8], encrypt: bool) -> Result<(), InvalidDataUnit> {
        check_data_unit(data)?;
        let mut first = GenericArray::from((sector as u128).to_le_bytes());
        self.tweak.encrypt_block(&mut first);
        let mut tweak = u128::from_le_bytes(first.into());

        let (blocks, _) = data.as_chunks_mut::<BLOCK>();
        let mut batch = [GenericArray::default(); BATCH_BLOCKS];
        let mut tweaks = [0u128; BATCH_BLOCKS];
        for chunk in blocks.chunks_mut(BATCH_BLOCKS) {
            // The batch's tweaks first, so that AES then runs over the whole batch at once.
            for ((block, t), bytes) in batch.iter_mut().zip(&mut tweaks).zip(chunk.iter()) {
                *t = tweak;
                *block = GenericArray::from((u128::from_le_bytes(*bytes) ^ tweak).to_le_bytes());
                tweak = mul_alpha(tweak);
            }
            let batch = &mut batch[..chunk.len()];
            if encrypt {
                self.data.encrypt_blocks(batch);
            } else {
                self.data.decrypt_blocks(batch);
            }
            for ((block, t), bytes) in batch.iter().zip(&tweaks).zip(chunk.iter_mut()) {
                *bytes = (u128::from_le_bytes((*block).into()) ^ t).to_le_bytes();
            }
        }
        Ok(())
    }
}

/// Multiplies a tweak by the primitive element alpha of GF(2^128) with the IEEE 1619 byte
/// order: the tweak as a little-endian integer shifted left by one, reduced by
/// `x^128 + x^7 + x^2 + x + 1` (0x87) when a bit falls off the top.
fn mul_alpha(tweak: u128) -> u128 {
    // Branch-free so that timing does not depend on the tweak.
    let carry = (tweak >> 127) as u8;
    (tweak << 1) ^ u128::from(0x87 & carry.wrapping_neg())
}

fn check_data_unit(data: &[u8]) -> Result<(), InvalidDataUnit> {
    if data.is_empty() || !data.len().is_multiple_of(BLOCK) {
        return Err(InvalidDataUnit { len: data.len() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn key(seed: u8) -> [u8; 64] {
        std::array::from_fn(|i| (i as u8).wrapping_mul(13) ^ seed)
    }

    #[test]
    fn mul_alpha_matches_xts_mode() {
        // Check through the cipher: the last block of a long sector only matches if every
        // tweak step does, including the carries.
        let xts = XtsAes256::new(&key(1)).unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let mut fast = vec![0u8; 65536];
        rng.fill(&mut fast[..]);
        let mut reference = fast.clone();
        xts.encrypt_sector(u64::MAX, &mut fast).unwrap();
        xts.encrypt_sector_reference(u64::MAX, &mut reference)
            .unwrap();
        assert!(fast == reference);
        assert_eq!(mul_alpha(1 << 127), 0x87);
        assert_eq!(mul_alpha(0x8000_0000_0000_0000_0000_0000_0000_0001), 0x85);
        assert_eq!(mul_alpha(3), 6);
    }

    /// The fast path equals `xts-mode` over random keys, sectors and lengths (1 to 300
    /// blocks: shorter, equal to and longer than a batch), both ways.
    #[test]
    fn fast_path_matches_the_reference() {
        let mut rng = StdRng::seed_from_u64(0x1619);
        for _ in 0..400 {
            let key: [u8; 64] = rng.random();
            let xts = XtsAes256::new(&key).unwrap();
            let sector = match rng.random_range(0..4) {
                0 => rng.random_range(0..4),
                1 => u64::MAX - rng.random_range(0..4),
                _ => rng.random(),
            };
            let blocks = rng.random_range(1..=300);
            let mut plain = vec![0u8; blocks * 16];
            rng.fill(&mut plain[..]);
            let mut fast = plain.clone();
            let mut reference = plain.clone();
            xts.encrypt_sector(sector, &mut fast).unwrap();
            xts.encrypt_sector_reference(sector, &mut reference)
                .unwrap();
            assert!(fast == reference, "encrypt: {blocks} blocks at {sector}");
            xts.decrypt_sector(sector, &mut fast).unwrap();
            assert!(fast == plain, "fast round trip");
            xts.decrypt_sector_reference(sector, &mut reference)
                .unwrap();
            assert!(reference == plain, "reference round trip");
        }
    }

    #[test]
    fn keys_and_data_units_are_checked() {
        for len in [0, 32, 63, 65, 128] {
            assert_eq!(
                XtsAes256::new(&vec![1; len]).unwrap_err(),
                InvalidKey::Length(len)
            );
        }
        let mut equal = [7u8; 64];
        assert_eq!(XtsAes256::new(&equal).unwrap_err(), InvalidKey::EqualHalves);
        equal[63] = 8;
        let xts = XtsAes256::new(&equal).unwrap();
        assert_eq!(format!("{xts:?}"), "XtsAes256 { .. }");
        for len in [0, 15, 17, 520] {
            let mut data = vec![0; len];
            let err = InvalidDataUnit { len };
            assert_eq!(xts.encrypt_sector(0, &mut data), Err(err));
            assert_eq!(xts.decrypt_sector(0, &mut data), Err(err));
            assert_eq!(xts.encrypt_sector_reference(0, &mut data), Err(err));
            assert_eq!(xts.decrypt_sector_reference(0, &mut data), Err(err));
        }
    }

    /// Compile-time proof that the key schedules are zeroed on drop: this stops building if
    /// the `aes` crate's `zeroize` feature is turned off.
    #[test]
    fn key_schedules_zeroize_on_drop() {
        fn zeroize_on_drop<T: ZeroizeOnDrop>() {}
        zeroize_on_drop::<Aes256>();
        zeroize_on_drop::<XtsAes256>();
    }
}
