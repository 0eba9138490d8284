//! The image header: parsing, validation against the file, feature bits, header extensions.

use crate::error::InvalidImage;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// The smallest and largest cluster sizes accepted, as `cluster_bits` (512 B to 2 MiB, as
/// QEMU accepts).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;
/// The largest L1 table accepted, in bytes (QEMU's limit).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// The largest refcount table accepted, in bytes (QEMU's limit).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// The largest virtual size accepted: 2^56 bytes... but never more than `i64::MAX`.
pub const MAX_VIRTUAL_BYTES: u64 = 1 << 56;

/// Header length of a version 2 image.
pub const V2_HEADER_LEN: u32 = 72;
/// The header length this crate writes for version 3 (with the compression type byte).
pub const V3_HEADER_LEN: u32 = 112;

/// Incompatible feature bits.
pub mod incompatible {
    /// Refcounts may be inconsistent (lazy refcounts were in use and the image was not closed).
    pub const DIRTY: u64 = 1 << 0;
    /// The image is corrupt: writing is unsafe.
    pub const CORRUPT: u64 = 1 << 1;
    /// Data lives in an external data file.
    pub const EXTERNAL_DATA: u64 = 1 << 2;
    /// The header's compression type field is valid.
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    /// L2 entries are 128 bits with subcluster bitmaps.
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Every bit this crate understands.
    pub const KNOWN: u64 = DIRTY | CORRUPT | EXTERNAL_DATA | COMPRESSION_TYPE | EXTENDED_L2;
}

/// Compatible feature bits.
pub mod compatible {
    /// Lazy refcounts: refcounts may lag while the dirty bit is set.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Header extension types.
mod extension {
    pub const END: u32 = 0;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FEATURE_NAMES: u32 = 0x6803_f857;
    pub const FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
    pub const EXTERNAL_DATA_FILE: u32 = 0x4441_5441;
}

/// How compressed clusters are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (RFC 1951), the only method of older images.
    Deflate,
    /// Zstandard frames.
    Zstd,
}

/// A parsed and validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// The backing file the image names (never opened by this crate), if any.
    pub backing_file: Option<String>,
    /// The format the image names for its backing file, if any.
    pub backing_format: Option<String>,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// The virtual disk size in bytes.
    pub size: u64,
    /// L1 entries.
    pub l1_size: u32,
    /// Byte offset of the L1 table.
    pub l1_table_offset: u64,
    /// Byte offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (0..=6).
    pub refcount_order: u32,
    /// Header length in bytes (where the extensions start).
    pub header_length: u32,
    /// How compressed clusters are compressed.
    pub compression: CompressionType,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("four bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("eight bytes"))
}

impl Header {
    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries are 128 bits with subcluster bitmaps.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompatible::EXTENDED_L2 != 0
    }

    /// Parses the header in `first_cluster` (the first bytes of the image, at least the
    /// header and its extensions; up to one cluster is looked at) of an image file of
    /// `file_size` bytes, and checks every field against the file.
    pub fn parse(first_cluster: &[u8], file_size: u64) -> Result<Self, InvalidImage> {
        let b = first_cluster;
        if b.len() < V2_HEADER_LEN as usize {
            return Err(InvalidImage::Truncated);
        }
        if be32(b, 0) != MAGIC {
            return Err(InvalidImage::BadMagic);
        }
        let version = be32(b, 4);
        if version != 2 && version != 3 {
            return Err(InvalidImage::UnsupportedVersion(version));
        }
        let cluster_bits = be32(b, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(InvalidImage::ClusterBits(cluster_bits));
        }
        let cluster_size = 1u64 << cluster_bits;
        let crypt_method = be32(b, 32);
        if crypt_method != 0 {
            return Err(InvalidImage::Encrypted);
        }
        let (incompatible, compatible, autoclear, refcount_order, header_length) = if version == 3 {
            if b.len() < 104 {
                return Err(InvalidImage::Truncated);
            }
            (
                be64(b, 72),
                be64(b, 80),
                be64(b, 88),
                be32(b, 96),
                be32(b, 100),
            )
        } else {
            (0, 0, 0, 4, V2_HEADER_LEN)
        };
        if version == 3 && (header_length < 104 || !header_length.is_multiple_of(8)) {
            return Err(InvalidImage::HeaderLength(header_length));
        }
        if header_length as u64 > cluster_size || header_length as usize > b.len() {
            return Err(InvalidImage::HeaderLength(header_length));
        }
        if refcount_order > 6 {
            return Err(InvalidImage::RefcountOrder(refcount_order));
        }
        let compression = if header_length > 104 {
            match b[104] {
                0 => CompressionType::Deflate,
                1 => CompressionType::Zstd,
                other => return Err(InvalidImage::CompressionType(other)),
            }
        } else {
            CompressionType::Deflate
        };
        if compression != CompressionType::Deflate
            && incompatible & incompatible::COMPRESSION_TYPE == 0
        {
            return Err(InvalidImage::CompressionType(b[104]));
        }

        let header = Header {
            version,
            backing_file: None,
            backing_format: None,
            cluster_bits,
            size: be64(b, 24),
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            incompatible_features: incompatible,
            compatible_features: compatible,
            autoclear_features: autoclear,
            refcount_order,
            header_length,
            compression,
        };
        let mut header = header;

        // Header extensions, each 8-byte aligned, all inside the first cluster.
        let mut feature_names: Vec<(u8, u8, String)> = Vec::new();
        let limit = (cluster_size as usize).min(b.len());
        let mut at = header_length as usize;
        loop {
            if at + 8 > limit {
                // A v2 image whose header fills the first bytes may end without an end
                // marker only if nothing follows; anything else is truncated.
                if version == 2 && at == header_length as usize {
                    break;
                }
                return Err(InvalidImage::Extensions);
            }
            let kind = be32(b, at);
            let len = be32(b, at + 4) as usize;
            if kind == extension::END {
                break;
            }
            let data_start = at + 8;
            let data_end = data_start
                .checked_add(len)
                .filter(|&end| end <= limit)
                .ok_or(InvalidImage::Extensions)?;
            let data = &b[data_start..data_end];
            match kind {
                extension::BACKING_FORMAT => {
                    header.backing_format = Some(String::from_utf8_lossy(data).into_owned());
                }
                extension::FEATURE_NAMES => {
                    for entry in data.chunks_exact(48) {
                        let name = entry[2..].split(|&c| c == 0).next().unwrap_or(&[]);
                        feature_names.push((
                            entry[0],
                            entry[1],
                            String::from_utf8_lossy(name).into_owned(),
                        ));
                    }
                }
                extension::FULL_DISK_ENCRYPTION => return Err(InvalidImage::Encrypted),
                extension::EXTERNAL_DATA_FILE => {
                    return Err(InvalidImage::UnsupportedFeatures {
                        names: "external data file".into(),
                    });
                }
                // Bitmaps and unknown extensions are left in place and ignored; unknown
                // extensions are allowed by the specification.
                _ => {}
            }
            at = data_start + len.next_multiple_of(8);
        }

        let unknown = incompatible & !incompatible::KNOWN;
        let unsupported = unknown | (incompatible & incompatible::EXTERNAL_DATA);
        if unsupported != 0 {
            let names: Vec<String> = (0..64)
                .filter(|bit| unsupported & (1 << bit) != 0)
                .map(|bit| {
                    feature_names
                        .iter()
                        .find(|(kind, b, _)| *kind == 0 && *b as u32 == bit)
                        .map(|(_, _, name)| format!("`{name}` (bit {bit})"))
                        .unwrap_or_else(|| match bit {
                            2 => "external data file (bit 2)".to_owned(),
                            _ => format!("unknown incompatible feature bit {bit}"),
                        })
                })
                .collect();
            return Err(InvalidImage::UnsupportedFeatures {
                names: names.join(", "),
            });
        }

        // The backing file name lies in the first cluster too.
        let backing_offset = be64(b, 8);
        let backing_size = be32(b, 16);
        if backing_offset != 0 {
            let end = backing_offset
                .checked_add(backing_size as u64)
                .filter(|&end| end <= limit as u64 && backing_size <= 1023)
                .ok_or(InvalidImage::BackingFileName)?;
            header.backing_file = Some(
                String::from_utf8_lossy(&b[backing_offset as usize..end as usize]).into_owned(),
            );
        }

        header.check_layout(file_size)?;
        Ok(header)
    }

    /// Checks the tables' positions and sizes against the file and each other. A file may
    /// end inside its last cluster (`qemu-img create` ends it right after the L1 table), and
    /// bytes past its end read as zeros, so tables need only start inside it (or at its end).
    fn check_layout(&self, file_size: u64) -> Result<(), InvalidImage> {
        let cluster_size = self.cluster_size();
        let file_size = file_size.next_multiple_of(cluster_size);
        if self.size > MAX_VIRTUAL_BYTES || self.size > i64::MAX as u64 {
            return Err(InvalidImage::VirtualSize(self.size));
        }
        let entry_bytes = if self.extended_l2() { 16 } else { 8 };
        if self.extended_l2() && self.cluster_bits < 14 {
            return Err(InvalidImage::ClusterBits(self.cluster_bits));
        }
        let bytes_per_l2 = (cluster_size / entry_bytes) * cluster_size;
        let l1_needed = self.size.div_ceil(bytes_per_l2);
        let l1_bytes = self.l1_size as u64 * 8;
        if (self.l1_size as u64) < l1_needed || l1_bytes > MAX_L1_BYTES {
            return Err(InvalidImage::L1Size(self.l1_size));
        }
        check_table(
            "l1 table",
            self.l1_table_offset,
            l1_bytes,
            cluster_size,
            file_size,
        )?;
        let reftable_bytes = self.refcount_table_clusters as u64 * cluster_size;
        if reftable_bytes == 0 || reftable_bytes > MAX_REFTABLE_BYTES {
            return Err(InvalidImage::RefcountTableSize(
                self.refcount_table_clusters,
            ));
        }
        check_table(
            "refcount table",
            self.refcount_table_offset,
            reftable_bytes,
            cluster_size,
            file_size,
        )?;
        Ok(())
    }

    /// The features a writer must clear in the header, as the specification says for
    /// autoclear bits this crate does not maintain (all of them: bitmaps and raw external
    /// data are not kept up to date here).
    pub fn autoclear_to_clear(&self) -> u64 {
        self.autoclear_features
    }
}

/// A table at `offset` of `bytes` must be cluster-aligned and lie inside the file.
fn check_table(
    what: &'static str,
    offset: u64,
    bytes: u64,
    cluster_size: u64,
    file_size: u64,
) -> Result<(), InvalidImage> {
    // Starting at the end is allowed: the host disk may hide a last partial sector, and
    // what lies past the end reads as zeros.
    let inside = offset <= file_size && bytes <= MAX_L1_BYTES.max(MAX_REFTABLE_BYTES);
    if !offset.is_multiple_of(cluster_size) || (bytes > 0 && (offset == 0 || !inside)) {
        return Err(InvalidImage::TableOutsideFile { what, offset });
    }
    Ok(())
}

/// Field offsets the layer rewrites in place.
pub(crate) mod field {
    pub const SIZE: usize = 24;
    pub const L1_SIZE: usize = 36;
    pub const L1_TABLE_OFFSET: usize = 40;
    pub const REFCOUNT_TABLE_OFFSET: usize = 48;
    pub const REFCOUNT_TABLE_CLUSTERS: usize = 56;
    pub const INCOMPATIBLE: usize = 72;
    pub const AUTOCLEAR: usize = 88;
}

/// Builds the header bytes of a new image (no backing file, no extensions but the end
/// marker): `header_len` bytes plus eight for the end of the extensions.
#[allow(clippy::too_many_arguments)]
pub(crate) fn build(
    version: u32,
    cluster_bits: u32,
    size: u64,
    l1_size: u32,
    l1_table_offset: u64,
    refcount_table_offset: u64,
    refcount_table_clusters: u32,
    refcount_order: u32,
) -> Vec<u8> {
    let len = if version == 2 {
        V2_HEADER_LEN
    } else {
        V3_HEADER_LEN
    } as usize;
    let mut b = vec![0u8; len + 8];
    b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&version.to_be_bytes());
    b[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
    b[24..32].copy_from_slice(&size.to_be_bytes());
    b[36..40].copy_from_slice(&l1_size.to_be_bytes());
    b[40..48].copy_from_slice(&l1_table_offset.to_be_bytes());
    b[48..56].copy_from_slice(&refcount_table_offset.to_be_bytes());
    b[56..60].copy_from_slice(&refcount_table_clusters.to_be_bytes());
    if version == 3 {
        b[96..100].copy_from_slice(&refcount_order.to_be_bytes());
        b[100..104].copy_from_slice(&(len as u32).to_be_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3(cluster_bits: u32) -> Vec<u8> {
        let mut b = build(
            3,
            cluster_bits,
            1 << 20,
            1,
            3 << cluster_bits,
            1 << cluster_bits,
            1,
            4,
        );
        b.resize(1 << cluster_bits, 0);
        b
    }

    const FILE: u64 = 1 << 30;

    #[test]
    fn round_trip() {
        let h = Header::parse(&v3(16), FILE).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.size, 1 << 20);
        assert_eq!(h.refcount_order, 4);
        assert_eq!(h.compression, CompressionType::Deflate);
        assert_eq!(h.backing_file, None);
        let mut v2 = build(2, 12, 1 << 20, 1, 3 << 12, 1 << 12, 1, 4);
        v2.resize(4096, 0);
        let h = Header::parse(&v2, FILE).unwrap();
        assert_eq!((h.version, h.refcount_order, h.header_length), (2, 4, 72));
    }

    #[test]
    fn truncated_and_corrupted_headers_are_refused() {
        let good = v3(16);
        for len in [0, 4, 71, 100] {
            assert!(Header::parse(&good[..len], FILE).is_err(), "{len}");
        }
        let cases: Vec<(usize, Vec<u8>, &str)> = vec![
            (0, vec![0, 0, 0, 0], "magic"),
            (4, 4u32.to_be_bytes().to_vec(), "version"),
            (20, 8u32.to_be_bytes().to_vec(), "cluster"),
            (20, 22u32.to_be_bytes().to_vec(), "cluster"),
            (32, 1u32.to_be_bytes().to_vec(), "encrypted"),
            (96, 7u32.to_be_bytes().to_vec(), "refcount"),
            (100, 70000u32.to_be_bytes().to_vec(), "header length"),
            (100, 99u32.to_be_bytes().to_vec(), "header length"),
            (24, u64::MAX.to_be_bytes().to_vec(), "virtual size"),
            (36, 0u32.to_be_bytes().to_vec(), "l1"),
            (36, u32::MAX.to_be_bytes().to_vec(), "l1"),
            (40, 12345u64.to_be_bytes().to_vec(), "l1 table"),
            (40, (FILE + 65536).to_be_bytes().to_vec(), "l1 table"),
            (48, 0u64.to_be_bytes().to_vec(), "refcount table"),
            (56, 0u32.to_be_bytes().to_vec(), "refcount table"),
            (56, u32::MAX.to_be_bytes().to_vec(), "refcount table"),
            (
                72,
                (1u64 << 40).to_be_bytes().to_vec(),
                "incompatible feature bit 40",
            ),
            (72, 4u64.to_be_bytes().to_vec(), "external data"),
            (8, 4000u64.to_be_bytes().to_vec(), "backing"),
        ];
        for (at, bytes, expect) in cases {
            let mut b = good.clone();
            b[at..at + bytes.len()].copy_from_slice(&bytes);
            if at == 8 {
                b[16..20].copy_from_slice(&1000u32.to_be_bytes());
                b.truncate(4096);
            }
            let err = Header::parse(&b, FILE).unwrap_err().to_string();
            assert!(err.contains(expect), "{at}: {err}");
        }
    }

    #[test]
    fn extensions_are_bounded() {
        let mut b = v3(16);
        // A backing format extension whose length runs past the cluster.
        b[112..116].copy_from_slice(&extension::BACKING_FORMAT.to_be_bytes());
        b[116..120].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            Header::parse(&b, FILE),
            Err(InvalidImage::Extensions)
        ));
        // A well-formed one, and a feature name for an unknown incompatible bit.
        b[116..120].copy_from_slice(&3u32.to_be_bytes());
        b[120..123].copy_from_slice(b"raw");
        b[128..132].copy_from_slice(&extension::FEATURE_NAMES.to_be_bytes());
        b[132..136].copy_from_slice(&48u32.to_be_bytes());
        b[136] = 0;
        b[137] = 9;
        b[138..143].copy_from_slice(b"fancy");
        let h = Header::parse(&b, FILE).unwrap();
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        b[72..80].copy_from_slice(&(1u64 << 9).to_be_bytes());
        let err = Header::parse(&b, FILE).unwrap_err().to_string();
        assert!(err.contains("`fancy` (bit 9)"), "{err}");
    }
}
