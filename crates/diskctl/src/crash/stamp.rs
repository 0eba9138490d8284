//! What a sector holds: every sector the writer writes carries a header naming the sector
//! and the write, so a reader can tell exactly which write (if any) a sector holds.
//!
//! Layout of a sector: magic (8 bytes), sector number (8), write id (8), CRC-32 of the rest
//! of the sector with the CRC field zeroed (4), zero (4), then a payload derived from the
//! sector and the write. Write id 0 is the initial contents the harness writes before each
//! run.

const MAGIC: u64 = u64::from_le_bytes(*b"CRASHSEC");
const HEADER: usize = 32;

/// The write id of the contents every sector gets before the writer starts.
pub const INITIAL_WRITE: u64 = 0;

/// Fills `sector_buf` (one whole sector) with what write `write` puts into `sector`.
pub fn stamp(sector_buf: &mut [u8], sector: u64, write: u64) {
    let seed = sector.rotate_left(29) ^ write.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for (i, word) in sector_buf[HEADER..].chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(
            &(seed ^ (i as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9)).to_le_bytes(),
        );
    }
    sector_buf[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    sector_buf[8..16].copy_from_slice(&sector.to_le_bytes());
    sector_buf[16..24].copy_from_slice(&write.to_le_bytes());
    sector_buf[24..32].fill(0);
    let crc = crc32fast::hash(&sector_buf[24..]);
    sector_buf[24..28].copy_from_slice(&crc.to_le_bytes());
}

/// What a sector read back holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// The data of write `0` (initial contents) or of a write the journal names.
    Write(u64),
    /// All zeros.
    Zeroes,
    /// A whole, valid sector of some write, but stamped for another sector: misplaced data.
    Misplaced {
        /// The sector the data was written for.
        sector: u64,
        /// The write.
        write: u64,
    },
    /// Neither zeros nor a valid sector: torn, corrupt or noise.
    Garbage,
}

impl std::fmt::Display for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Write(INITIAL_WRITE) => f.write_str("the initial contents"),
            Self::Write(write) => write!(f, "write {write}"),
            Self::Zeroes => f.write_str("zeros"),
            Self::Misplaced { sector, write } => {
                write!(f, "write {write}'s data for sector {sector} (misplaced)")
            }
            Self::Garbage => f.write_str("garbage (torn or corrupt)"),
        }
    }
}

/// Decodes one sector read from `sector`.
pub fn decode(sector_buf: &[u8], sector: u64) -> Content {
    let word = |at: usize| u64::from_le_bytes(sector_buf[at..at + 8].try_into().expect("8 bytes"));
    if sector_buf.iter().all(|&b| b == 0) {
        return Content::Zeroes;
    }
    if sector_buf.len() < HEADER + 8 || word(0) != MAGIC {
        return Content::Garbage;
    }
    let mut copy = sector_buf[24..].to_vec();
    copy[0..4].fill(0);
    let crc = u32::from_le_bytes(sector_buf[24..28].try_into().expect("4 bytes"));
    if crc32fast::hash(&copy) != crc {
        return Content::Garbage;
    }
    let (stamped_sector, write) = (word(8), word(16));
    if stamped_sector != sector {
        return Content::Misplaced {
            sector: stamped_sector,
            write,
        };
    }
    Content::Write(write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_kind_of_damage() {
        for size in [512, 4096] {
            let mut buf = vec![0u8; size];
            assert_eq!(decode(&buf, 3), Content::Zeroes);
            stamp(&mut buf, 3, 17);
            assert_eq!(decode(&buf, 3), Content::Write(17));
            assert_eq!(
                decode(&buf, 4),
                Content::Misplaced {
                    sector: 3,
                    write: 17
                }
            );
            let mut torn = buf.clone();
            stamp(&mut torn[..], 3, 18);
            torn[size / 2..].copy_from_slice(&buf[size / 2..]);
            assert_eq!(decode(&torn, 3), Content::Garbage);
            buf[size - 1] ^= 1;
            assert_eq!(decode(&buf, 3), Content::Garbage);
        }
    }
}
