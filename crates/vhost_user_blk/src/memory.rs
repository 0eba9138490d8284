//! The frontend's memory table: the regions `SET_MEM_TABLE` hands over, mapped from their
//! file descriptors into one [`GuestMemory`], and the translation of the frontend's own
//! (user) addresses, which is what `SET_VRING_ADDR` carries, to guest physical addresses.

use guestmem::{BuildError, GuestMemory};
use std::fs::File;
use std::os::fd::AsFd;
use thiserror::Error;

/// One region of a memory table, as the frontend describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    /// Guest physical address of the region's first byte.
    pub guest_phys_addr: u64,
    /// Length in bytes.
    pub memory_size: u64,
    /// Where the frontend has the region mapped in its own address space.
    pub user_addr: u64,
    /// Offset of the region's first byte in its file descriptor.
    pub mmap_offset: u64,
}

/// Size of one region in a `SET_MEM_TABLE` body: address, size, user address, file offset.
pub const REGION_BYTES: usize = 32;

/// The regions of a `SET_MEM_TABLE` message body: a 32-bit region count, 4 bytes of
/// padding, then [`REGION_BYTES`] per region (guest physical address, size, user address,
/// file offset, each 64-bit little-endian). Regions past the count are ignored (User-Mode
/// Linux always sends room for two); `None` if the count is 0, above `max_regions`, or
/// larger than the body holds.
///
/// The server decodes every `SET_MEM_TABLE` with this; it is public so that the fuzz target
/// (`fuzz/fuzz_targets/vhost_user_messages.rs`) reaches the same code without a socket.
pub fn decode_mem_table(body: &[u8], max_regions: usize) -> Option<Vec<MemoryRegion>> {
    let count = u32::from_le_bytes(body.get(..4)?.try_into().ok()?) as usize;
    if count == 0 || count > max_regions {
        return None;
    }
    let table = body.get(8..8 + count * REGION_BYTES)?;
    let regions = table
        .chunks_exact(REGION_BYTES)
        .map(|region| {
            let field = |i: usize| {
                u64::from_le_bytes(region[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
            };
            MemoryRegion {
                guest_phys_addr: field(0),
                memory_size: field(1),
                user_addr: field(2),
                mmap_offset: field(3),
            }
        })
        .collect();
    Some(regions)
}

/// Mapping a memory table failed. The old table, if any, stays in use.
#[derive(Debug, Error)]
pub enum MapMemoryError {
    /// The number of file descriptors differs from the number of regions.
    #[error("memory table has {regions} regions but {files} file descriptors")]
    FileCount {
        /// Regions in the table.
        regions: usize,
        /// File descriptors attached.
        files: usize,
    },
    /// A region's end overflows its file offset or the user address space.
    #[error("memory region {index} overflows the address space")]
    Overflow {
        /// The region's position in the table.
        index: usize,
    },
    /// A region reaches past the end of its file: touching that part would kill the process
    /// with `SIGBUS`.
    #[error("memory region {index} ends at byte {end} of a file of {file_len} bytes")]
    PastEndOfFile {
        /// The region's position in the table.
        index: usize,
        /// The file offset the region ends at.
        end: u64,
        /// The file's size.
        file_len: u64,
    },
    /// The region's file could not be inspected.
    #[error("cannot inspect the file of memory region {index}")]
    Stat {
        /// The region's position in the table.
        index: usize,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A region could not be mapped (unaligned, too large, or `mmap` refused).
    #[error("cannot map memory region {index}")]
    Map {
        /// The region's position in the table.
        index: usize,
        /// Why.
        #[source]
        source: BuildError,
    },
    /// The regions overlap in guest physical addresses.
    #[error("memory regions overlap")]
    Overlap(#[source] BuildError),
}

/// A mapped memory table.
#[derive(Debug, Clone)]
pub struct MemoryTable {
    memory: GuestMemory,
    regions: Vec<MemoryRegion>,
}

impl MemoryTable {
    /// Maps `files[i]` for `regions[i]`, shared and writable.
    ///
    /// Every region must be page-aligned in guest physical address, size and file offset,
    /// lie inside its file (for regular files, which are what memfds and shared-memory
    /// files are), and no two regions may overlap in guest physical addresses.
    pub fn map(regions: &[MemoryRegion], files: &[File]) -> Result<Self, MapMemoryError> {
        if regions.len() != files.len() {
            return Err(MapMemoryError::FileCount {
                regions: regions.len(),
                files: files.len(),
            });
        }
        let mut builder = GuestMemory::builder();
        for (index, (region, file)) in regions.iter().zip(files).enumerate() {
            let end = region
                .mmap_offset
                .checked_add(region.memory_size)
                .ok_or(MapMemoryError::Overflow { index })?;
            region
                .user_addr
                .checked_add(region.memory_size)
                .ok_or(MapMemoryError::Overflow { index })?;
            let metadata = file
                .metadata()
                .map_err(|source| MapMemoryError::Stat { index, source })?;
            if metadata.is_file() && end > metadata.len() {
                return Err(MapMemoryError::PastEndOfFile {
                    index,
                    end,
                    file_len: metadata.len(),
                });
            }
            builder = builder
                .file(
                    region.guest_phys_addr,
                    region.memory_size,
                    file.as_fd(),
                    region.mmap_offset,
                    true,
                )
                .map_err(|source| MapMemoryError::Map { index, source })?;
        }
        let memory = builder.build().map_err(MapMemoryError::Overlap)?;
        Ok(Self {
            memory,
            regions: regions.to_vec(),
        })
    }

    /// The guest memory the regions make up.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The regions, as the frontend described them.
    pub fn regions(&self) -> &[MemoryRegion] {
        &self.regions
    }

    /// The guest physical address of the frontend's user address `user_addr`, or `None` if
    /// no region holds it.
    pub fn translate(&self, user_addr: u64) -> Option<u64> {
        self.regions.iter().find_map(|region| {
            let offset = user_addr.checked_sub(region.user_addr)?;
            (offset < region.memory_size).then(|| region.guest_phys_addr + offset)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::memfd::{MFdFlags, memfd_create};

    const PAGE: u64 = 4096;

    fn memfd(len: u64) -> File {
        let fd = memfd_create("test", MFdFlags::MFD_CLOEXEC).expect("memfd");
        let file = File::from(fd);
        file.set_len(len).expect("size");
        file
    }

    fn region(gpa: u64, size: u64, user: u64, offset: u64) -> MemoryRegion {
        MemoryRegion {
            guest_phys_addr: gpa,
            memory_size: size,
            user_addr: user,
            mmap_offset: offset,
        }
    }

    #[test]
    fn translates_through_the_region_table() {
        let table = MemoryTable::map(
            &[
                region(0, 4 * PAGE, 0x7f00_0000_0000, 0),
                region(1 << 32, 2 * PAGE, 0x7f10_0000_0000, 4 * PAGE),
            ],
            &[memfd(4 * PAGE), memfd(6 * PAGE)],
        )
        .expect("map");
        assert_eq!(table.translate(0x7f00_0000_0010), Some(0x10));
        assert_eq!(table.translate(0x7f10_0000_1000), Some((1 << 32) + 0x1000));
        assert_eq!(table.translate(0x7f00_0000_4000), None, "one past the end");
        assert_eq!(table.translate(0x10), None);
        // Both regions are really mapped: a write through one is visible in the file.
        table.memory().write_plain(1 << 32, &7u32).expect("write");
        assert_eq!(table.memory().read_plain::<u32>(1 << 32).expect("read"), 7);
    }

    #[test]
    fn mem_table_bodies_decode() {
        let mut body = vec![0u8; 8 + 2 * REGION_BYTES];
        body[0] = 1;
        for (i, field) in [0x1000u64, 0x2000, 0x7f00_0000_0000, 0x3000]
            .iter()
            .enumerate()
        {
            body[8 + 8 * i..16 + 8 * i].copy_from_slice(&field.to_le_bytes());
        }
        // The second region's room is ignored, as User-Mode Linux sends it.
        assert_eq!(
            decode_mem_table(&body, 8),
            Some(vec![region(0x1000, 0x2000, 0x7f00_0000_0000, 0x3000)])
        );
        body[0] = 2;
        assert_eq!(decode_mem_table(&body, 8).map(|r| r.len()), Some(2));
        assert_eq!(
            decode_mem_table(&body, 1),
            None,
            "more regions than allowed"
        );
        body[0] = 3;
        assert_eq!(decode_mem_table(&body, 8), None, "count past the body");
        body[0] = 0;
        assert_eq!(decode_mem_table(&body, 8), None, "no region");
        assert_eq!(decode_mem_table(&body[..3], 8), None, "no count");
    }

    #[test]
    fn bad_tables_are_errors() {
        let fail = |regions: &[MemoryRegion], files: &[File]| {
            MemoryTable::map(regions, files).expect_err("a bad table must be refused")
        };
        assert!(matches!(
            fail(&[region(0, PAGE, 0, 0)], &[]),
            MapMemoryError::FileCount { .. }
        ));
        assert!(matches!(
            fail(&[region(0, 4 * PAGE, 0, 0)], &[memfd(PAGE)]),
            MapMemoryError::PastEndOfFile { index: 0, .. }
        ));
        assert!(matches!(
            fail(&[region(0, PAGE, 0, u64::MAX - 10)], &[memfd(PAGE)]),
            MapMemoryError::Overflow { index: 0 }
        ));
        assert!(matches!(
            fail(&[region(0, PAGE, u64::MAX - 10, 0)], &[memfd(PAGE)]),
            MapMemoryError::Overflow { index: 0 }
        ));
        assert!(matches!(
            fail(&[region(100, PAGE, 0, 0)], &[memfd(PAGE)]),
            MapMemoryError::Map { index: 0, .. }
        ));
        assert!(matches!(
            fail(&[region(0, PAGE, 0, 100)], &[memfd(2 * PAGE)]),
            MapMemoryError::Map { index: 0, .. }
        ));
        assert!(matches!(
            fail(
                &[region(0, 2 * PAGE, 0, 0), region(PAGE, PAGE, 1 << 20, 0)],
                &[memfd(2 * PAGE), memfd(PAGE)]
            ),
            MapMemoryError::Overlap(_)
        ));
    }
}
