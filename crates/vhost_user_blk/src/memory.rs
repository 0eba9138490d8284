//! The frontend's memory table: the regions it shares, each mapped from its file descriptor,
//! together one [`GuestMemory`], and the translation of the frontend's own (user) addresses,
//! which is what `SET_VRING_ADDR` carries, to guest physical addresses.
//!
//! A frontend describes the table whole (`SET_MEM_TABLE`: QEMU without
//! `CONFIGURE_MEM_SLOTS`, User-Mode Linux) or region by region (`ADD_MEM_REG`, `REM_MEM_REG`:
//! libblkio, QEMU with `CONFIGURE_MEM_SLOTS`). Regions may have any size and alignment the
//! protocol allows: libblkio's ring region is as long as its rings (15120 bytes for one
//! 256-entry queue), and its guest addresses are its own virtual addresses.
//!
//! A [`MemoryTable`] never changes. Adding or removing a region makes a new table that
//! shares the mappings of the regions that stay ([`MemoryTable::with_region`],
//! [`MemoryTable::without_region`]); a region is unmapped when the last table, and the last
//! [`GuestMemory`] handle a request in flight holds, lets go of it. So a request that started
//! before its memory was removed finishes on memory that is still mapped in this process,
//! never on a stale pointer.

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

/// The most regions a table holds when the frontend adds them one by one: what
/// `GET_MAX_MEM_SLOTS` answers and `ADD_MEM_REG` enforces. The number libvhost-user and
/// QEMU's own backends announce (KVM's 509 usable memory slots on x86), so that a frontend
/// that describes a VM's memory to several backends is limited by none of ours.
pub const MAX_MEM_SLOTS: usize = 509;

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

/// Mapping a memory table or a region failed. The old table, if any, stays in use.
#[derive(Debug, Error)]
pub enum MapMemoryError {
    /// A region of no bytes.
    #[error("memory region {index} is empty")]
    Empty {
        /// The region's position in the table.
        index: usize,
    },
    /// Adding the region would make the table larger than the frontend was told it may be
    /// ([`MAX_MEM_SLOTS`]).
    #[error("the memory table already holds the most regions it may ({max})")]
    TooMany {
        /// The most regions a table holds.
        max: usize,
    },
    /// The number of file descriptors differs from the number of regions.
    #[error("memory table has {regions} regions but {files} file descriptors")]
    FileCount {
        /// Regions in the table.
        regions: usize,
        /// File descriptors attached.
        files: usize,
    },
    /// A region's end overflows its file offset, or the user or guest address space.
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
    /// A region could not be mapped (too large for this host, or `mmap` refused).
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
    /// Every region's memory, for the device.
    memory: GuestMemory,
    /// The regions as the frontend described them, in the order it did.
    regions: Vec<MemoryRegion>,
    /// Each region's own mapping, in the order of `regions`: what a new table shares.
    mappings: Vec<GuestMemory>,
}

impl MemoryTable {
    /// A table without regions, which [`with_region`](Self::with_region) adds to.
    pub fn empty() -> Self {
        Self {
            memory: GuestMemory::empty(),
            regions: Vec::new(),
            mappings: Vec::new(),
        }
    }

    /// Maps `files[i]` for `regions[i]`, shared and writable.
    ///
    /// Every region must be non-empty, lie inside its file (for regular files, which are
    /// what memfds and shared-memory files are) and inside the address spaces, and no two
    /// regions may overlap in guest physical addresses. Sizes, addresses and file offsets
    /// need no alignment.
    pub fn map(regions: &[MemoryRegion], files: &[File]) -> Result<Self, MapMemoryError> {
        if regions.len() != files.len() {
            return Err(MapMemoryError::FileCount {
                regions: regions.len(),
                files: files.len(),
            });
        }
        let mappings = regions
            .iter()
            .zip(files)
            .enumerate()
            .map(|(index, (region, file))| map_region(index, region, file))
            .collect::<Result<Vec<_>, _>>()?;
        Self::assemble(regions.to_vec(), mappings)
    }

    /// This table with `region` added, mapped from `file` (`ADD_MEM_REG`), checked as
    /// [`map`](Self::map) checks each region; at most `max_regions` regions in all. The
    /// regions already there are shared, not mapped again.
    pub fn with_region(
        &self,
        region: &MemoryRegion,
        file: &File,
        max_regions: usize,
    ) -> Result<Self, MapMemoryError> {
        let index = self.regions.len();
        if index >= max_regions {
            return Err(MapMemoryError::TooMany { max: max_regions });
        }
        let mapping = map_region(index, region, file)?;
        let mut regions = self.regions.clone();
        regions.push(*region);
        let mut mappings = self.mappings.clone();
        mappings.push(mapping);
        Self::assemble(regions, mappings)
    }

    /// This table without the region that has `region`'s guest address, size and user
    /// address (`REM_MEM_REG`; its file offset is not compared), or `None` if no region
    /// matches. Memory the removed region holds stays mapped while older tables or their
    /// [`GuestMemory`] handles live.
    pub fn without_region(&self, region: &MemoryRegion) -> Option<Self> {
        let index = self.regions.iter().position(|r| {
            r.guest_phys_addr == region.guest_phys_addr
                && r.memory_size == region.memory_size
                && r.user_addr == region.user_addr
        })?;
        let mut regions = self.regions.clone();
        regions.remove(index);
        let mut mappings = self.mappings.clone();
        mappings.remove(index);
        // The regions left passed every check when they were added, together.
        let memory = mappings
            .iter()
            .fold(GuestMemory::builder(), |builder, mapping| {
                builder.include(mapping)
            })
            .build()
            .ok()?;
        Some(Self {
            memory,
            regions,
            mappings,
        })
    }

    fn assemble(
        regions: Vec<MemoryRegion>,
        mappings: Vec<GuestMemory>,
    ) -> Result<Self, MapMemoryError> {
        let memory = mappings
            .iter()
            .fold(GuestMemory::builder(), |builder, mapping| {
                builder.include(mapping)
            })
            .build()
            .map_err(MapMemoryError::Overlap)?;
        Ok(Self {
            memory,
            regions,
            mappings,
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
    /// no region holds it. Where regions overlap in user addresses (the same memory at two
    /// guest addresses), the first region of the table that holds it answers.
    pub fn translate(&self, user_addr: u64) -> Option<u64> {
        self.regions.iter().find_map(|region| {
            let offset = user_addr.checked_sub(region.user_addr)?;
            (offset < region.memory_size).then(|| region.guest_phys_addr + offset)
        })
    }
}

/// Checks `region` (at position `index` of its table) against its file and maps it.
fn map_region(
    index: usize,
    region: &MemoryRegion,
    file: &File,
) -> Result<GuestMemory, MapMemoryError> {
    if region.memory_size == 0 {
        return Err(MapMemoryError::Empty { index });
    }
    let end = region
        .mmap_offset
        .checked_add(region.memory_size)
        .ok_or(MapMemoryError::Overflow { index })?;
    region
        .user_addr
        .checked_add(region.memory_size)
        .ok_or(MapMemoryError::Overflow { index })?;
    region
        .guest_phys_addr
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
    GuestMemory::builder()
        .file(
            region.guest_phys_addr,
            region.memory_size,
            file.as_fd(),
            region.mmap_offset,
            true,
        )
        .and_then(|builder| builder.build())
        .map_err(|source| MapMemoryError::Map { index, source })
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
            fail(&[region(u64::MAX - 10, PAGE, 0, 0)], &[memfd(PAGE)]),
            MapMemoryError::Overflow { index: 0 }
        ));
        assert!(matches!(
            fail(
                &[region(0, PAGE, 0, 0), region(PAGE, 0, 0, 0)],
                &[memfd(PAGE), memfd(PAGE)]
            ),
            MapMemoryError::Empty { index: 1 }
        ));
        assert!(matches!(
            fail(
                &[region(0, 2 * PAGE, 0, 0), region(PAGE, PAGE, 1 << 20, 0)],
                &[memfd(2 * PAGE), memfd(PAGE)]
            ),
            MapMemoryError::Overlap(_)
        ));
    }

    /// Regions need no alignment: libblkio's rings are one region exactly as long as they
    /// are, at the address it has them mapped, and any region may start inside a page of
    /// its file.
    #[test]
    fn regions_of_any_size_and_offset_map() {
        let user = 0x7f3a_1234_5000;
        let table = MemoryTable::map(
            &[
                region(user, 15120, user, 0),
                region(0x1_0000_0100, 1000, 0x7f00_0000_0100, PAGE + 0x100),
            ],
            &[memfd(15120), memfd(2 * PAGE)],
        )
        .expect("map");
        assert_eq!(table.translate(user + 15119), Some(user + 15119));
        assert_eq!(table.translate(user + 15120), None);
        assert_eq!(
            table.translate(0x7f00_0000_0100 + 999),
            Some(0x1_0000_0100 + 999)
        );
        table
            .memory()
            .write_plain(user + 15116, &1u32)
            .expect("last bytes");
        assert!(table.memory().read_plain::<u32>(user + 15118).is_err());
    }

    #[test]
    fn regions_are_added_and_removed() {
        let (a, b) = (memfd(4 * PAGE), memfd(PAGE));
        let first = region(0, 4 * PAGE, 0x7f00_0000_0000, 0);
        let second = region(1 << 32, 100, 0x7f10_0000_0000, 8);
        let table = MemoryTable::empty()
            .with_region(&first, &a, MAX_MEM_SLOTS)
            .expect("add")
            .with_region(&second, &b, MAX_MEM_SLOTS)
            .expect("add");
        assert_eq!(table.regions(), [first, second]);
        table
            .memory()
            .write_plain((1 << 32) + 96, &5u32)
            .expect("write");
        // Removal names the region by guest address, size and user address; the file
        // offset may differ (the protocol says to ignore it).
        let smaller = table
            .without_region(&MemoryRegion {
                mmap_offset: 0,
                ..second
            })
            .expect("remove");
        assert_eq!(smaller.regions(), [first]);
        assert_eq!(smaller.translate(0x7f10_0000_0000), None);
        assert!(smaller.memory().read_plain::<u32>(1 << 32).is_err());
        // The old table (what requests in flight hold) still reaches the removed memory.
        assert_eq!(table.memory().read_plain::<u32>((1 << 32) + 96).unwrap(), 5);
        drop(table);
        let empty = smaller.without_region(&first).expect("remove the last");
        assert!(empty.regions().is_empty());
        assert!(empty.memory().read_plain::<u8>(0).is_err());
    }

    #[test]
    fn hostile_region_changes_are_refused() {
        let file = memfd(4 * PAGE);
        let base = region(0, 2 * PAGE, 0x7f00_0000_0000, 0);
        let table = MemoryTable::empty()
            .with_region(&base, &file, 3)
            .expect("add");
        let add = |r: MemoryRegion| table.with_region(&r, &file, 3).map(|_| ());
        assert!(matches!(
            add(region(PAGE, PAGE, 0x7f10_0000_0000, 0)),
            Err(MapMemoryError::Overlap(_))
        ));
        assert!(matches!(add(base), Err(MapMemoryError::Overlap(_))));
        assert!(matches!(
            add(region(1 << 32, 0, 0x7f10_0000_0000, 0)),
            Err(MapMemoryError::Empty { index: 1 })
        ));
        assert!(matches!(
            add(region(1 << 32, u64::MAX, 0x7f10_0000_0000, 0)),
            Err(MapMemoryError::Overflow { index: 1 })
        ));
        assert!(matches!(
            add(region(u64::MAX - PAGE + 1, 2 * PAGE, 0x7f10_0000_0000, 0)),
            Err(MapMemoryError::Overflow { index: 1 })
        ));
        assert!(matches!(
            add(region(1 << 32, PAGE, 0x7f10_0000_0000, 4 * PAGE - 1)),
            Err(MapMemoryError::PastEndOfFile { index: 1, .. })
        ));
        // One more region fits; the one after does not.
        let full = table
            .with_region(&region(1 << 32, PAGE, 0x7f10_0000_0000, 0), &file, 3)
            .expect("second")
            .with_region(&region(2 << 32, PAGE, 0x7f20_0000_0000, 0), &file, 3)
            .expect("third");
        assert!(matches!(
            full.with_region(&region(3 << 32, PAGE, 0x7f30_0000_0000, 0), &file, 3),
            Err(MapMemoryError::TooMany { max: 3 })
        ));
        // Removal must name a region exactly.
        assert!(
            table
                .without_region(&region(0, PAGE, 0x7f00_0000_0000, 0))
                .is_none()
        );
        assert!(
            table
                .without_region(&region(0, 2 * PAGE, 0x7f00_0000_1000, 0))
                .is_none()
        );
        assert!(
            table
                .without_region(&region(PAGE, 2 * PAGE, 0x7f00_0000_0000, 0))
                .is_none()
        );
        assert!(MemoryTable::empty().without_region(&base).is_none());
    }
}
