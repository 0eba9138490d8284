//! Split virtqueue descriptors and the chains they form.
//!
//! A chain is walked once, when it is popped, into a list of [`Segment`]s; nothing later
//! reads the descriptor table again, so a driver that rewrites descriptors while the device
//! works cannot change a request half way through.

use crate::spec::ring::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use guestmem::{AccessError, GuestMemory};
use smallvec::SmallVec;
use thiserror::Error;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// A descriptor as laid out in a descriptor table (16 bytes, little-endian).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct Descriptor {
    /// Guest physical address of the buffer.
    pub addr: U64,
    /// Length of the buffer in bytes.
    pub len: U32,
    /// `DESC_F_NEXT`, `DESC_F_WRITE`, `DESC_F_INDIRECT`.
    pub flags: U16,
    /// Index of the next descriptor when `DESC_F_NEXT` is set.
    pub next: U16,
}

impl Descriptor {
    /// Size of a descriptor in bytes.
    pub const SIZE: u64 = 16;

    /// A descriptor with these fields.
    pub fn new(addr: u64, len: u32, flags: u16, next: u16) -> Self {
        Self {
            addr: addr.into(),
            len: len.into(),
            flags: flags.into(),
            next: next.into(),
        }
    }
}

/// One buffer of a chain: `len` bytes at guest physical address `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Whether the device may write the buffer (otherwise it may only read it).
    pub writable: bool,
}

/// The segments of one chain, stored inline for the short chains block requests use.
pub type Segments = SmallVec<[Segment; 8]>;

/// A descriptor chain popped from the available ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DescriptorChain {
    head: u16,
    segments: Segments,
}

impl DescriptorChain {
    /// The index of the head descriptor: what goes back into the used ring.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// The buffers, in chain order (through an indirect table if the head pointed at one).
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Takes the segments out.
    pub fn into_segments(self) -> Segments {
        self.segments
    }
}

/// A chain the driver built is malformed. The device cannot tell which buffers the driver
/// meant, so the queue is broken: the caller returns the head unused and asks for a reset.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChainError {
    /// A descriptor index is not below the queue (or indirect table) size.
    #[error("descriptor index {index} out of range for a table of {size}")]
    IndexOutOfRange {
        /// The index.
        index: u16,
        /// Entries in the table.
        size: u32,
    },
    /// The chain has more descriptors than the table it lives in: it loops, or the driver
    /// broke the rule that chains are at most the queue size.
    #[error("descriptor chain longer than its table of {size} (a loop)")]
    TooLong {
        /// Entries in the table.
        size: u32,
    },
    /// An indirect descriptor although `RING_INDIRECT_DESC` was not negotiated.
    #[error("indirect descriptor without the indirect feature")]
    IndirectNotNegotiated,
    /// An indirect descriptor that is not the only descriptor of its chain (it has `NEXT`,
    /// or follows other descriptors), or one inside an indirect table.
    #[error("indirect descriptor not alone at the head of its chain")]
    IndirectMisplaced,
    /// An indirect table whose length is 0, not a multiple of 16, or more entries than the
    /// queue size.
    #[error("indirect table of {len} bytes is empty, ragged or larger than the queue")]
    IndirectTableLength {
        /// The table's length in bytes.
        len: u32,
    },
    /// The descriptor table (or an indirect table) is not in guest memory.
    #[error("descriptor table not in guest memory")]
    Memory(#[source] AccessError),
}

/// Reads the chain starting at descriptor `head` of the `queue_size`-entry table at
/// `desc_table`.
///
/// Loops are found by counting: a chain of more descriptors than its table holds must
/// revisit one, so the walk stops at `queue_size` (and an indirect table's walk at its own
/// entry count), and memory use is bounded by the queue size whatever the driver wrote.
pub fn read_chain(
    mem: &GuestMemory,
    desc_table: u64,
    queue_size: u16,
    head: u16,
    indirect_allowed: bool,
) -> Result<DescriptorChain, ChainError> {
    let size = u32::from(queue_size);
    let mut segments = Segments::new();
    let mut index = head;
    let mut count = 0u32;
    loop {
        if u32::from(index) >= size {
            return Err(ChainError::IndexOutOfRange { index, size });
        }
        count += 1;
        if count > size {
            return Err(ChainError::TooLong { size });
        }
        let desc = read_descriptor(mem, desc_table, index)?;
        let flags = desc.flags.get();
        if flags & DESC_F_INDIRECT != 0 {
            if !indirect_allowed {
                return Err(ChainError::IndirectNotNegotiated);
            }
            // Only the head may point at a table, and then it is the whole chain: the spec
            // forbids INDIRECT with NEXT, and Linux never puts one elsewhere.
            if count != 1 || flags & DESC_F_NEXT != 0 {
                return Err(ChainError::IndirectMisplaced);
            }
            read_indirect(mem, &desc, size, &mut segments)?;
            break;
        }
        segments.push(Segment {
            addr: desc.addr.get(),
            len: desc.len.get(),
            writable: flags & DESC_F_WRITE != 0,
        });
        if flags & DESC_F_NEXT == 0 {
            break;
        }
        index = desc.next.get();
    }
    Ok(DescriptorChain { head, segments })
}

fn read_descriptor(mem: &GuestMemory, table: u64, index: u16) -> Result<Descriptor, ChainError> {
    // `index` is below the table size, which was validated against guest memory when the
    // queue went live, but an indirect table's address is the driver's: check every access.
    let gpa = table
        .checked_add(u64::from(index) * Descriptor::SIZE)
        .ok_or(ChainError::Memory(AccessError::AddressOverflow {
            gpa: table,
            len: Descriptor::SIZE,
        }))?;
    mem.read_plain(gpa).map_err(ChainError::Memory)
}

fn read_indirect(
    mem: &GuestMemory,
    desc: &Descriptor,
    queue_size: u32,
    segments: &mut Segments,
) -> Result<(), ChainError> {
    let len = desc.len.get();
    let entries = len / Descriptor::SIZE as u32;
    if len == 0 || !len.is_multiple_of(Descriptor::SIZE as u32) || entries > queue_size {
        return Err(ChainError::IndirectTableLength { len });
    }
    let table = desc.addr.get();
    let mut index = 0u16;
    let mut count = 0u32;
    loop {
        if u32::from(index) >= entries {
            return Err(ChainError::IndexOutOfRange {
                index,
                size: entries,
            });
        }
        count += 1;
        if count > entries {
            return Err(ChainError::TooLong { size: entries });
        }
        let d = read_descriptor(mem, table, index)?;
        let flags = d.flags.get();
        if flags & DESC_F_INDIRECT != 0 {
            return Err(ChainError::IndirectMisplaced);
        }
        segments.push(Segment {
            addr: d.addr.get(),
            len: d.len.get(),
            writable: flags & DESC_F_WRITE != 0,
        });
        if flags & DESC_F_NEXT == 0 {
            return Ok(());
        }
        index = d.next.get();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guestmem::PAGE_SIZE;

    fn table(mem: &GuestMemory, at: u64, descs: &[Descriptor]) {
        for (i, d) in descs.iter().enumerate() {
            mem.write_plain(at + i as u64 * 16, d).unwrap();
        }
    }

    #[test]
    fn walks_direct_and_indirect_chains() {
        let mem = GuestMemory::allocate(4 * PAGE_SIZE);
        table(
            &mem,
            0,
            &[
                Descriptor::new(0x1000, 16, DESC_F_NEXT, 2),
                Descriptor::default(),
                Descriptor::new(0x2000, 1, DESC_F_WRITE, 0),
                Descriptor::new(0x3000, 32, DESC_F_INDIRECT, 0),
            ],
        );
        table(
            &mem,
            0x3000,
            &[
                Descriptor::new(0x100, 16, DESC_F_NEXT, 1),
                Descriptor::new(0x200, 512, DESC_F_WRITE, 0),
            ],
        );
        let chain = read_chain(&mem, 0, 4, 0, false).unwrap();
        assert_eq!(chain.head(), 0);
        assert_eq!(chain.segments().len(), 2);
        assert!(chain.segments()[1].writable);
        let chain = read_chain(&mem, 0, 4, 3, true).unwrap();
        assert_eq!(chain.segments()[1].len, 512);
        assert_eq!(
            read_chain(&mem, 0, 4, 3, false),
            Err(ChainError::IndirectNotNegotiated)
        );
    }

    #[test]
    fn loops_and_bad_indices_are_errors() {
        let mem = GuestMemory::allocate(PAGE_SIZE);
        table(
            &mem,
            0,
            &[
                Descriptor::new(0, 1, DESC_F_NEXT, 1),
                Descriptor::new(0, 1, DESC_F_NEXT, 0),
                Descriptor::new(0, 1, DESC_F_NEXT, 9),
            ],
        );
        assert_eq!(
            read_chain(&mem, 0, 4, 0, false),
            Err(ChainError::TooLong { size: 4 })
        );
        assert_eq!(
            read_chain(&mem, 0, 4, 2, false),
            Err(ChainError::IndexOutOfRange { index: 9, size: 4 })
        );
        assert!(matches!(
            read_chain(&mem, u64::MAX - 8, 4, 1, false),
            Err(ChainError::Memory(_))
        ));
    }
}
