//! Table entries: L1 and L2 entries (standard and extended) and packed refcounts.

/// Set in L1 and L2 entries whose cluster has refcount exactly 1 (may be written in place).
pub const COPIED: u64 = 1 << 63;
/// Set in L2 entries of compressed clusters.
pub const COMPRESSED: u64 = 1 << 62;
/// Set in (version 3, standard) L2 entries of clusters that read as zeros.
pub const ZERO: u64 = 1;
/// The host offset bits of L1 entries and of uncompressed L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// What one guest cluster (or subcluster) maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Not in this image: the layers below supply it.
    Unallocated,
    /// Reads as zeros. `prealloc` is a host cluster still referenced by the entry.
    Zero {
        /// The preallocated host cluster, if any.
        prealloc: u64,
    },
    /// Data at host byte offset `host` (of the cluster, or of the subcluster).
    Data {
        /// Host byte offset.
        host: u64,
        /// Refcount is 1: may be written in place.
        copied: bool,
    },
    /// Compressed data of the whole cluster.
    Compressed {
        /// Host byte offset of the compressed data.
        offset: u64,
        /// Bytes of compressed data (an upper bound: up to the end of its last sector).
        len: u64,
    },
}

/// Decodes a standard (64-bit) L2 entry. `zero_flag` is whether bit 0 means "reads as zeros"
/// (version 3 without extended L2 entries).
pub fn decode_l2(entry: u64, cluster_bits: u32, zero_flag: bool) -> Mapping {
    if entry & COMPRESSED != 0 {
        let x = 62 - (cluster_bits - 8);
        let offset = entry & ((1u64 << x) - 1);
        let sectors = ((entry >> x) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
        let len = sectors * 512 - (offset & 511);
        return Mapping::Compressed { offset, len };
    }
    let host = entry & OFFSET_MASK;
    if zero_flag && entry & ZERO != 0 {
        return Mapping::Zero { prealloc: host };
    }
    if host == 0 {
        Mapping::Unallocated
    } else {
        Mapping::Data {
            host,
            copied: entry & COPIED != 0,
        }
    }
}

/// Decodes subcluster `index` of an extended L2 entry (`entry`, `bitmap`).
pub fn decode_extended(entry: u64, bitmap: u64, index: u32, subcluster_size: u64) -> Mapping {
    if entry & COMPRESSED != 0 {
        // Compressed clusters have no subclusters; the caller decodes them as standard.
        return Mapping::Unallocated;
    }
    let host = entry & OFFSET_MASK;
    if bitmap & (1 << (32 + index)) != 0 {
        Mapping::Zero { prealloc: 0 }
    } else if bitmap & (1 << index) != 0 {
        Mapping::Data {
            host: host + index as u64 * subcluster_size,
            copied: entry & COPIED != 0,
        }
    } else {
        Mapping::Unallocated
    }
}

/// The host clusters (byte offsets) a compressed cluster's data touches.
pub fn compressed_clusters(offset: u64, len: u64, cluster_bits: u32) -> impl Iterator<Item = u64> {
    let first = offset >> cluster_bits;
    let last = (offset + len.max(1) - 1) >> cluster_bits;
    (first..=last).map(move |c| c << cluster_bits)
}

/// Reads refcount `index` of a refcount block with `1 << order`-bit entries.
pub fn get_refcount(block: &[u8], index: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let byte = block[index / per_byte];
            let shift = (index % per_byte) * bits;
            ((byte >> shift) as u64) & ((1 << bits) - 1)
        }
        3 => block[index] as u64,
        4 => u16::from_be_bytes([block[index * 2], block[index * 2 + 1]]) as u64,
        5 => u32::from_be_bytes(block[index * 4..index * 4 + 4].try_into().expect("4")) as u64,
        _ => u64::from_be_bytes(block[index * 8..index * 8 + 8].try_into().expect("8")),
    }
}

/// The largest refcount of width `1 << order` bits.
pub fn max_refcount(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1 << order)) - 1
    }
}

/// Writes refcount `index` (which must fit the width); returns the byte index it changed.
pub fn set_refcount(block: &mut [u8], index: usize, order: u32, value: u64) -> usize {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let at = index / per_byte;
            let shift = (index % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            block[at] = (block[at] & !mask) | (((value as u8) << shift) & mask);
            at
        }
        3 => {
            block[index] = value as u8;
            index
        }
        4 => {
            block[index * 2..index * 2 + 2].copy_from_slice(&(value as u16).to_be_bytes());
            index * 2
        }
        5 => {
            block[index * 4..index * 4 + 4].copy_from_slice(&(value as u32).to_be_bytes());
            index * 4
        }
        _ => {
            block[index * 8..index * 8 + 8].copy_from_slice(&value.to_be_bytes());
            index * 8
        }
    }
}

/// Reads big-endian u64 entry `index` of a table held as bytes.
pub fn get_u64(table: &[u8], index: usize) -> u64 {
    u64::from_be_bytes(table[index * 8..index * 8 + 8].try_into().expect("8"))
}

/// Writes big-endian u64 entry `index` of a table held as bytes.
pub fn set_u64(table: &mut [u8], index: usize, value: u64) {
    table[index * 8..index * 8 + 8].copy_from_slice(&value.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_widths_round_trip() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 512];
            let entries = (512 * 8) >> order;
            let max = max_refcount(order);
            for i in 0..entries {
                set_refcount(&mut block, i, order, (i as u64 * 7) % (max.min(1000) + 1));
            }
            for i in 0..entries {
                assert_eq!(
                    get_refcount(&block, i, order),
                    (i as u64 * 7) % (max.min(1000) + 1),
                    "order {order} index {i}"
                );
            }
        }
        // QEMU's order for sub-byte widths: the lowest bits are the first entry.
        let mut block = [0u8; 1];
        set_refcount(&mut block, 0, 0, 1);
        assert_eq!(block[0], 1);
        set_refcount(&mut block, 1, 1, 3);
        assert_eq!(block[0], 0b1101);
    }

    #[test]
    fn l2_entries() {
        assert_eq!(decode_l2(0, 16, true), Mapping::Unallocated);
        assert_eq!(decode_l2(1, 16, true), Mapping::Zero { prealloc: 0 });
        assert_eq!(decode_l2(1, 16, false), Mapping::Unallocated);
        assert_eq!(
            decode_l2(COPIED | 0x30000, 16, true),
            Mapping::Data {
                host: 0x30000,
                copied: true
            }
        );
        // Compressed, 64 KiB clusters: offset in bits 0..54, sector count above it.
        let entry = COMPRESSED | (2u64 << 54) | 0x1234;
        assert_eq!(
            decode_l2(entry, 16, true),
            Mapping::Compressed {
                offset: 0x1234,
                len: 3 * 512 - 0x34
            }
        );
        assert_eq!(
            compressed_clusters(0xfff0, 0x20, 16).collect::<Vec<_>>(),
            vec![0, 0x10000]
        );
        assert_eq!(
            decode_extended(0x40000, 1 | (1 << 33), 0, 2048),
            Mapping::Data {
                host: 0x40000,
                copied: false
            }
        );
        assert_eq!(
            decode_extended(0x40000, 1 | (1 << 33), 1, 2048),
            Mapping::Zero { prealloc: 0 }
        );
        assert_eq!(
            decode_extended(0x40000, 1 | (1 << 33), 2, 2048),
            Mapping::Unallocated
        );
    }
}
