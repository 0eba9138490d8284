//! The vhost-user-blk backend under a hostile frontend, two ways:
//!
//! - calls: the backend's message handlers called directly (as the `vhost` crate does once it
//!   has decoded a message) with arbitrary memory tables over shared memfds, regions added
//!   and removed one by one (`ADD_MEM_REG`, `REM_MEM_REG`), ring sizes,
//!   addresses, bases, kicks, enables, features, configuration reads and writes and resets,
//!   while the target pokes guest memory;
//! - bytes: arbitrary messages (header, body, attached descriptors) written to a socket and
//!   served by `serve_connection`, the server's own loop: the `vhost` crate's decoding, the
//!   server's `SET_MEM_TABLE` decoder (`memory::decode_mem_table`) and the handlers.
//!
//! Oracle: nothing panics or hangs. A memory table the backend accepts is one
//! `MemoryTable::map` accepts, a region it adds one `MemoryTable::with_region` adds, a
//! region it removes one `MemoryTable::without_region` finds; the table translates a user address exactly when one of its
//! regions holds it, to that region's guest address plus the offset, which lies in mapped
//! memory; a ring the backend runs has its descriptor table, available and used rings
//! translated from their user addresses and wholly inside the mapped memory; a
//! configuration access succeeds exactly inside the 256-byte window and reads as many bytes
//! as asked, and the capacity it reads is the disk's. The backend is built once and reset
//! between inputs, as the server does between connections.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use disk_backend::Disk;
use disk_ram::RamDisk;
use libfuzzer_sys::fuzz_target;
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use std::fs::File;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};
use vhost::vhost_user::VhostUserBackendReqHandler;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserMemoryRegion, VhostUserSingleMemoryRegion,
    VhostUserVringAddrFlags,
};
use vhost_user_blk::memory::{MAX_MEM_SLOTS, MemoryRegion, MemoryTable, decode_mem_table};
use vhost_user_blk::{VhostUserBlk, serve_connection};
use virtio_block::BlockConfig;

const PAGE: u64 = 4096;
/// Pages in each shared memory file.
const FILE_PAGES: u64 = 8;
const FILES: usize = 3;
const QUEUES: u16 = 2;
const QUEUE_MAX: u16 = 16;
const SECTORS: u64 = 64;
/// The configuration window the backend serves.
const CONFIG_LIMIT: u64 = 0x100;
/// Calls per input, at most.
const MAX_CALLS: usize = 48;
/// User addresses the frontend pretends to map its memory at.
const USER_BASE: u64 = 0x7f00_0000_0000;

struct Fixture {
    backend: Arc<VhostUserBlk>,
    /// Guest memory files, shared by every input and zeroed before each.
    files: Vec<File>,
    /// Never readable: the server's stop descriptor.
    stop: (UnixStream, UnixStream),
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let disk = Disk::new(RamDisk::new(SECTORS, 512).unwrap()).unwrap();
        let config = BlockConfig {
            num_queues: QUEUES,
            queue_size: QUEUE_MAX,
            ..Default::default()
        };
        let backend = Arc::new(VhostUserBlk::new(disk, config).unwrap());
        let files = (0..FILES)
            .map(|_| {
                let fd =
                    nix::sys::memfd::memfd_create("guest", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                        .unwrap();
                let file = File::from(fd);
                file.set_len(FILE_PAGES * PAGE).unwrap();
                file
            })
            .collect();
        Fixture {
            backend,
            files,
            stop: UnixStream::pair().unwrap(),
        }
    })
}

fn eventfd() -> File {
    File::from(OwnedFd::from(nix::sys::eventfd::EventFd::new().unwrap()))
}

/// An address: usually page-aligned and near the regions, sometimes anything.
#[derive(Debug, Arbitrary)]
enum Addr {
    Pages(u8),
    Near(u16),
    Raw(u64),
}

impl Addr {
    fn get(&self, base: u64) -> u64 {
        match *self {
            Addr::Pages(n) => base + u64::from(n % 32) * PAGE,
            Addr::Near(n) => base + u64::from(n),
            Addr::Raw(n) => n,
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Region {
    guest: Addr,
    pages: u8,
    user: Addr,
    file_offset: Addr,
    file: u8,
}

#[derive(Debug, Arbitrary)]
enum Call {
    SetMemTable(Vec<Region>),
    SetVringNum {
        index: u8,
        num: u32,
    },
    SetVringAddr {
        index: u8,
        desc: Addr,
        avail: Addr,
        used: Addr,
    },
    SetVringBase {
        index: u8,
        base: u32,
    },
    GetVringBase(u8),
    SetVringKick(u8),
    SetVringCall(u8),
    SetVringEnable {
        index: u8,
        enable: bool,
    },
    SetFeatures(u64),
    SetProtocolFeatures(u64),
    GetConfig {
        offset: u16,
        size: u16,
    },
    SetConfig {
        offset: u16,
        bytes: Vec<u8>,
    },
    Translate(Addr),
    Poke {
        at: Addr,
        bytes: [u8; 8],
    },
    ResetDevice,
    AddMemReg(Region),
    RemMemReg(Region),
}

/// A message for the socket: request code, flags, body, and how many descriptors ride
/// along (memfds for `SET_MEM_TABLE`, eventfds otherwise).
#[derive(Debug, Arbitrary)]
struct Message {
    request: u8,
    flags: u8,
    /// Replaces the body length in the header, to lie about it.
    size: Option<u16>,
    body: Vec<u8>,
    fds: u8,
}

/// `VHOST_USER_SET_MEM_TABLE`.
const SET_MEM_TABLE: u32 = 5;
/// `VHOST_USER_ADD_MEM_REG`.
const ADD_MEM_REG: u32 = 37;

impl Region {
    fn describe(&self) -> MemoryRegion {
        MemoryRegion {
            guest_phys_addr: self.guest.get(0),
            memory_size: u64::from(self.pages % (FILE_PAGES as u8 + 2)) * PAGE,
            user_addr: self.user.get(USER_BASE),
            mmap_offset: self.file_offset.get(0),
        }
    }

    fn single(&self) -> VhostUserSingleMemoryRegion {
        let r = self.describe();
        VhostUserSingleMemoryRegion::new(
            r.guest_phys_addr,
            r.memory_size,
            r.user_addr,
            r.mmap_offset,
        )
    }
}

struct Model {
    /// The table the backend holds, mapped on our side too.
    table: Option<MemoryTable>,
    /// Ring addresses per queue as the frontend sent them.
    rings: [Option<[u64; 3]>; QUEUES as usize],
    sizes: [u16; QUEUES as usize],
}

fn check_translation(table: &MemoryTable, user_addr: u64) {
    let holder = table.regions().iter().find(|r| {
        user_addr
            .checked_sub(r.user_addr)
            .is_some_and(|offset| offset < r.memory_size)
    });
    let gpa = table.translate(user_addr);
    match (holder, gpa) {
        (None, None) => {}
        (Some(region), Some(gpa)) => {
            assert_eq!(gpa, region.guest_phys_addr + (user_addr - region.user_addr));
            table
                .memory()
                .check_range(gpa, 1, true)
                .expect("a translated address is mapped");
        }
        (holder, gpa) => panic!("{user_addr:#x}: held by {holder:?}, translated to {gpa:?}"),
    }
}

fn run_calls(u: &mut Unstructured<'_>, fixture: &Fixture) {
    let backend = &fixture.backend;
    let mut model = Model {
        table: None,
        rings: [None; QUEUES as usize],
        sizes: [QUEUE_MAX; QUEUES as usize],
    };
    // At most `MAX_CALLS` calls: enough to set up and tear down every ring, and an input
    // that grows past it costs time on every run without reaching new states.
    for _ in 0..MAX_CALLS {
        if u.is_empty() {
            break;
        }
        let Ok(call) = Call::arbitrary(u) else { break };
        match call {
            Call::SetMemTable(regions) => {
                let mut files = Vec::new();
                let regions: Vec<MemoryRegion> = regions
                    .iter()
                    .take(4)
                    .map(|r| {
                        files.push(&fixture.files[usize::from(r.file) % FILES]);
                        r.describe()
                    })
                    .collect();
                let owned: Vec<File> = files.iter().map(|f| f.try_clone().unwrap()).collect();
                let expected = MemoryTable::map(&regions, &owned);
                let messages: Vec<VhostUserMemoryRegion> = regions
                    .iter()
                    .map(|r| {
                        VhostUserMemoryRegion::new(
                            r.guest_phys_addr,
                            r.memory_size,
                            r.user_addr,
                            r.mmap_offset,
                        )
                    })
                    .collect();
                let result = backend.set_mem_table(&messages, owned, None);
                match expected {
                    Ok(table) => model.table = Some(table),
                    Err(e) => assert!(
                        result.is_err(),
                        "the backend accepted a table `map` refuses: {e}"
                    ),
                }
            }
            Call::SetVringNum { index, num } => {
                let _ = backend.set_vring_num(u32::from(index % 3), num);
                // A valid size is kept even when restarting the rings with it fails.
                let valid = u16::try_from(num).is_ok_and(|n| n.is_power_of_two() && n <= QUEUE_MAX);
                if valid && index % 3 < QUEUES as u8 {
                    model.sizes[usize::from(index % 3)] = num as u16;
                }
            }
            Call::SetVringAddr {
                index,
                desc,
                avail,
                used,
            } => {
                let addresses = [
                    desc.get(USER_BASE),
                    avail.get(USER_BASE),
                    used.get(USER_BASE),
                ];
                let index = index % 3;
                let _ = backend.set_vring_addr(
                    u32::from(index),
                    VhostUserVringAddrFlags::empty(),
                    addresses[0],
                    addresses[2],
                    addresses[1],
                    0,
                );
                if index < QUEUES as u8 {
                    model.rings[usize::from(index)] = Some(addresses);
                }
            }
            Call::SetVringBase { index, base } => {
                let _ = backend.set_vring_base(u32::from(index % 3), base);
            }
            Call::GetVringBase(index) => {
                let _ = backend.get_vring_base(u32::from(index % 3));
            }
            Call::SetVringKick(index) => {
                let _ = backend.set_vring_kick(index % 3, Some(eventfd()));
            }
            Call::SetVringCall(index) => {
                let _ = backend.set_vring_call(index % 3, Some(eventfd()));
            }
            Call::SetVringEnable { index, enable } => {
                let _ = backend.set_vring_enable(u32::from(index % 3), enable);
            }
            Call::SetFeatures(features) => {
                let _ = backend.set_features(features);
            }
            Call::SetProtocolFeatures(features) => {
                let _ = backend.set_protocol_features(features);
            }
            Call::GetConfig { offset, size } => {
                let (offset, size) = (u32::from(offset % 0x120), u32::from(size % 0x120));
                let result = backend.get_config(offset, size, VhostUserConfigFlags::empty());
                let inside = u64::from(offset) + u64::from(size) <= CONFIG_LIMIT;
                assert_eq!(result.is_ok(), inside, "get_config({offset}, {size})");
                if let Ok(bytes) = result {
                    assert_eq!(bytes.len(), size as usize);
                    if offset == 0 && size >= 8 {
                        assert_eq!(
                            u64::from_le_bytes(bytes[..8].try_into().unwrap()),
                            SECTORS,
                            "capacity"
                        );
                    }
                }
            }
            Call::SetConfig { offset, bytes } => {
                let offset = u32::from(offset % 0x120);
                let result = backend.set_config(offset, &bytes, VhostUserConfigFlags::empty());
                let inside = u64::from(offset) + bytes.len() as u64 <= CONFIG_LIMIT;
                assert_eq!(
                    result.is_ok(),
                    inside,
                    "set_config({offset}, {} bytes)",
                    bytes.len()
                );
            }
            Call::Translate(addr) => {
                if let Some(table) = &model.table {
                    check_translation(table, addr.get(USER_BASE));
                }
            }
            Call::Poke { at, bytes } => {
                if let Some(table) = &model.table {
                    let _ = table.memory().write_at(at.get(0), &bytes);
                }
            }
            Call::AddMemReg(r) => {
                let file = fixture.files[usize::from(r.file) % FILES]
                    .try_clone()
                    .unwrap();
                let empty = MemoryTable::empty();
                let expected = model.table.as_ref().unwrap_or(&empty).with_region(
                    &r.describe(),
                    &file,
                    MAX_MEM_SLOTS,
                );
                let result = backend.add_mem_region(&r.single(), file, None);
                match expected {
                    Ok(table) => model.table = Some(table),
                    Err(e) => assert!(
                        result.is_err(),
                        "the backend added a region `with_region` refuses: {e}"
                    ),
                }
            }
            Call::RemMemReg(r) => {
                let expected = model
                    .table
                    .as_ref()
                    .and_then(|t| t.without_region(&r.describe()));
                let result = backend.remove_mem_region(&r.single());
                match expected {
                    Some(table) => model.table = Some(table),
                    None => assert!(
                        result.is_err(),
                        "the backend removed a region it does not hold"
                    ),
                }
            }
            Call::ResetDevice => {
                let _ = backend.reset_device();
                model.rings = [None; QUEUES as usize];
                model.sizes = [QUEUE_MAX; QUEUES as usize];
            }
        }
        check_rings(backend, &model);
    }
}

/// Every ring the backend runs lives, translated, inside mapped memory.
fn check_rings(backend: &VhostUserBlk, model: &Model) {
    for queue in 0..usize::from(QUEUES) {
        if !backend.is_running(queue) {
            continue;
        }
        let table = model
            .table
            .as_ref()
            .expect("a running ring without a memory table");
        let [desc, avail, used] = model.rings[queue].expect("a running ring without addresses");
        let size = u64::from(model.sizes[queue]);
        for (user_addr, len) in [
            (desc, 16 * size),
            (avail, 6 + 2 * size),
            (used, 6 + 8 * size),
        ] {
            check_translation(table, user_addr);
            let gpa = table
                .translate(user_addr)
                .expect("a running ring's address translates");
            table
                .memory()
                .check_range(gpa, len as usize, true)
                .expect("a running ring is inside guest memory");
        }
    }
}

fn run_bytes(u: &mut Unstructured<'_>, fixture: &Fixture) {
    let Ok(messages) = u.arbitrary::<Vec<Message>>() else {
        return;
    };
    let (frontend, backend_end) = UnixStream::pair().unwrap();
    for message in messages.iter().take(32) {
        let request = u32::from(message.request % 48);
        let body = &message.body[..message.body.len().min(512)];
        let size = message.size.map_or(body.len() as u32, u32::from);
        let mut bytes = Vec::with_capacity(12 + body.len());
        bytes.extend_from_slice(&request.to_le_bytes());
        bytes.extend_from_slice(&u32::from(message.flags & 0xf).to_le_bytes());
        bytes.extend_from_slice(&size.to_le_bytes());
        bytes.extend_from_slice(body);
        let memory = request == SET_MEM_TABLE || request == ADD_MEM_REG;
        if request == SET_MEM_TABLE {
            // The server's own decoder, on the body as it will receive it.
            let _ = decode_mem_table(body, 32);
        }
        let files: Vec<File> = (0..message.fds % 5)
            .map(|i| {
                if memory {
                    fixture.files[usize::from(i) % FILES].try_clone().unwrap()
                } else {
                    eventfd()
                }
            })
            .collect();
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let control: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
        if sendmsg::<()>(
            frontend.as_raw_fd(),
            &[IoSlice::new(&bytes)],
            control,
            MsgFlags::empty(),
            None,
        )
        .is_err()
        {
            break;
        }
    }
    frontend.shutdown(std::net::Shutdown::Write).unwrap();
    // Keep the frontend open so that replies do not fail with EPIPE; it has said everything.
    let _ = serve_connection(&fixture.backend, backend_end, fixture.stop.0.as_fd());
    drop(frontend);
}

fuzz_target!(|data: &[u8]| {
    let fixture = fixture();
    // Fresh zeroed memory: no mapping of the files outlives an input (the backend was reset
    // and the model's table dropped), so truncating them is safe, and costs nothing for
    // pages no one touched.
    for file in &fixture.files {
        file.set_len(0).unwrap();
        file.set_len(FILE_PAGES * PAGE).unwrap();
    }
    let mut u = Unstructured::new(data);
    let Ok(bytes_mode) = u.arbitrary::<bool>() else {
        return;
    };
    if bytes_mode {
        run_bytes(&mut u, fixture);
    } else {
        run_calls(&mut u, fixture);
    }
    // As the server does when a connection ends.
    fixture.backend.reset();
});
