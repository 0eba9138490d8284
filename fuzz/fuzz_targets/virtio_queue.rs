//! A split virtqueue driven by a hostile driver: descriptor tables, indirect tables and ring
//! indices all come from the input, and the driver keeps rewriting memory between pops.
//!
//! Oracle: nothing panics; every pop ends (a queue-size bound on each chain and on the
//! entries pending); no chain has more segments than the queue size; every head the device
//! consumed, well-formed or not, is back in the used ring, unless the device stopped with
//! an error that needs a reset (an avail index jump consumes nothing).

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use guestmem::GuestMemory;
use libfuzzer_sys::fuzz_target;
use virtio_block::descriptor::Descriptor;
use virtio_block::queue::{QueueConfig, QueueError, QueueState, SplitQueue};
use zerocopy::little_endian::U16;

const MEM: usize = 64 << 10;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const MAX_SIZE: u16 = 16;

#[derive(Debug, Arbitrary)]
enum Step {
    /// The driver scribbles anywhere but the used ring (tables, rings, buffers).
    Poke {
        at: u16,
        bytes: [u8; 8],
    },
    Descriptor {
        index: u8,
        addr: u16,
        far: bool,
        len: u16,
        flags: u8,
        next: u8,
    },
    Publish {
        head: u8,
    },
    SetAvailIdx(u16),
    SetUsedEvent(u16),
    Pop,
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(size_shift) = u.int_in_range(0..=4u32) else {
        return;
    };
    let size = 1u16 << size_shift;
    let (Ok(indirect), Ok(event_idx), Ok(start)) = (
        u.arbitrary::<bool>(),
        u.arbitrary::<bool>(),
        u.arbitrary::<u16>(),
    ) else {
        return;
    };
    let mem = GuestMemory::allocate(MEM);
    let config = QueueConfig {
        max_size: MAX_SIZE,
        size,
        ready: true,
        desc_table: DESC,
        avail_ring: AVAIL,
        used_ring: USED,
    };
    // Resume from arbitrary indices, as after a restore; the driver's copy agrees.
    let state = QueueState {
        next_avail: start,
        next_used: start,
    };
    mem.write_plain(AVAIL + 2, &U16::new(start)).unwrap();
    mem.write_plain(USED + 2, &U16::new(start)).unwrap();
    let mut queue = SplitQueue::new(mem.clone(), &config, state, indirect, event_idx).unwrap();
    let mut driver_avail = start;
    let mut popped = 0u16;
    let mut stopped = false;
    while !u.is_empty() && !stopped {
        let Ok(step) = Step::arbitrary(&mut u) else {
            break;
        };
        match step {
            Step::Poke { at, bytes } => {
                // Everything but the used ring page, which only the device writes.
                let at = u64::from(at) % (MEM as u64 - 0x1000 - 8);
                let at = if at + 8 > USED { at + 0x1000 + 8 } else { at };
                let _ = mem.write_at(at, &bytes);
            }
            Step::Descriptor {
                index,
                addr,
                far,
                len,
                flags,
                next,
            } => {
                let addr = if far {
                    u64::from(addr) << 40 | 0xfff
                } else {
                    u64::from(addr)
                };
                let desc = Descriptor::new(addr, len.into(), (flags & 7).into(), next.into());
                let _ = mem.write_plain(DESC + 16 * u64::from(index % MAX_SIZE as u8), &desc);
            }
            Step::Publish { head } => {
                let slot = u64::from(driver_avail % size);
                mem.write_plain(AVAIL + 4 + 2 * slot, &U16::new(head.into()))
                    .unwrap();
                driver_avail = driver_avail.wrapping_add(1);
                mem.write_plain(AVAIL + 2, &U16::new(driver_avail)).unwrap();
            }
            Step::SetAvailIdx(idx) => {
                driver_avail = idx;
                mem.write_plain(AVAIL + 2, &U16::new(idx)).unwrap();
            }
            Step::SetUsedEvent(idx) => {
                mem.write_plain(AVAIL + 4 + 2 * u64::from(size), &U16::new(idx))
                    .unwrap();
            }
            Step::Pop => loop {
                match queue.pop() {
                    Ok(Some(chain)) => {
                        assert!(
                            chain.segments().len() <= usize::from(size),
                            "chain longer than the queue"
                        );
                        queue.add_used(chain.head(), 0).unwrap();
                        popped = popped.wrapping_add(1);
                    }
                    Ok(None) => {
                        let _ = queue.needs_notification().unwrap();
                        if !queue.enable_notification().unwrap() {
                            break;
                        }
                    }
                    Err(QueueError::Chain { .. }) => {
                        // Consumed and already returned with length 0.
                        popped = popped.wrapping_add(1);
                        stopped = true;
                        break;
                    }
                    Err(QueueError::AvailIndexJump { .. }) => {
                        stopped = true;
                        break;
                    }
                    Err(e) => panic!("rings are in guest memory, yet {e}"),
                }
            },
        }
    }
    let state = queue.state();
    assert_eq!(
        state.next_avail.wrapping_sub(start),
        popped,
        "consumed what was popped"
    );
    assert_eq!(
        state.next_used.wrapping_sub(start),
        popped,
        "every consumed head returned"
    );
    assert_eq!(
        mem.read_plain::<U16>(USED + 2).unwrap().get(),
        state.next_used
    );
});
