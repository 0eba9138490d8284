//! The guest memory handle and its regions.

use crate::alloc::HeapAllocation;
use crate::{AccessError, BuildError, PAGE_SIZE, PAGE_SIZE64};
use std::any::Any;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU64, Ordering};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// The size of a transparent huge page (a PMD of 4 KiB pages on x86-64 and arm64).
const HUGE_PAGE_SIZE: usize = 2 << 20;

/// A cheap-clone handle to guest RAM.
///
/// Guest RAM is a set of non-overlapping regions, each a run of guest physical addresses
/// backed by host memory the handle keeps alive. Cloning the handle clones an `Arc`; a
/// region's memory is unmapped when the last handle that holds it (a clone, a
/// [`LockedPages`](crate::LockedPages), or another handle that took the region over with
/// [`GuestMemoryBuilder::include`]) goes away.
///
/// Why a struct and not a trait object: every request touches guest memory several times,
/// and a concrete type keeps those accesses free of dynamic dispatch and lets
/// [`lock`](Self::lock) hand out host addresses for zero-copy I/O. Backings that this crate
/// does not create itself are attached with [`GuestMemoryBuilder::external`].
#[derive(Clone)]
pub struct GuestMemory {
    inner: Arc<Inner>,
}

struct Inner {
    /// Sorted by `gpa`, non-overlapping.
    regions: Box<[Region]>,
}

struct Region {
    gpa: u64,
    len: u64,
    host: *mut u8,
    writable: bool,
    /// Shared with every handle the region was [included](GuestMemoryBuilder::include) in.
    _backing: Arc<Backing>,
}

// SAFETY: `host` points into `_backing`, which the region keeps alive and which has no
// thread affinity; all access through `host` is by raw copies that tolerate concurrent
// writers.
unsafe impl Send for Region {}
// SAFETY: as above: shared access to a `Region` only ever reads `host` and copies through it.
unsafe impl Sync for Region {}

/// What keeps a region's memory alive; never read, only dropped.
#[expect(dead_code, reason = "held only for its destructor")]
enum Backing {
    Heap(HeapAllocation),
    Mapping(Mapping),
    External(Arc<dyn Any + Send + Sync>),
}

struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a `Mapping` owns an address range it unmaps once, when dropped; it never reads or
// writes through the pointer, and `munmap` may be called from any thread. Sharing a
// region's backing between handles on different threads (an `Arc`) is therefore sound.
unsafe impl Send for Mapping {}
// SAFETY: as above: a shared `Mapping` gives access to nothing.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping created by `mmap` that nothing else unmaps.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

impl Region {
    fn end(&self) -> u64 {
        self.gpa + self.len
    }
}

impl std::fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut list = f.debug_list();
        for region in self.inner.regions.iter() {
            list.entry(&format_args!(
                "{:#x}..{:#x}{}",
                region.gpa,
                region.end(),
                if region.writable { "" } else { " (ro)" }
            ));
        }
        list.finish()
    }
}

impl GuestMemory {
    /// Guest memory with no regions: every non-empty access fails.
    pub fn empty() -> Self {
        Self {
            inner: Arc::new(Inner {
                regions: Box::new([]),
            }),
        }
    }

    /// Zeroed heap memory at guest physical address 0, `len` rounded up to whole pages.
    ///
    /// This is what tests and owned request buffers use.
    pub fn allocate(len: usize) -> Self {
        let len = len.next_multiple_of(PAGE_SIZE);
        if len == 0 {
            return Self::empty();
        }
        Self::builder()
            .heap(0, len as u64)
            .and_then(GuestMemoryBuilder::build)
            .expect("a single page-aligned heap region at 0 is always valid")
    }

    /// Starts describing guest memory region by region.
    pub fn builder() -> GuestMemoryBuilder {
        GuestMemoryBuilder {
            regions: Vec::new(),
        }
    }

    /// The regions as `(guest physical address, length in bytes, writable)`, sorted by address.
    pub fn regions(&self) -> impl Iterator<Item = (u64, u64, bool)> + '_ {
        self.inner
            .regions
            .iter()
            .map(|r| (r.gpa, r.len, r.writable))
    }

    /// The host memory of each region as `(guest physical address, host buffer, writable)`,
    /// sorted by address: for registering all of guest RAM with the kernel once (io_uring
    /// fixed buffers), so that later I/O can name it instead of having it pinned per
    /// request. The buffers stay valid while a clone of this handle lives; never form Rust
    /// references to them.
    pub fn host_regions(&self) -> impl Iterator<Item = (u64, crate::IoBuffer, bool)> + '_ {
        self.inner.regions.iter().map(|r| {
            (
                r.gpa,
                crate::IoBuffer::new(r.host, r.len as usize),
                r.writable,
            )
        })
    }

    /// Checks that `gpa..gpa+len` is backed by guest memory (and writable if `write`).
    pub fn check_range(&self, gpa: u64, len: usize, write: bool) -> Result<(), AccessError> {
        self.walk(gpa, len, write, |_, _, _| {})
    }

    /// Copies guest memory at `gpa` into `dst`.
    pub fn read_at(&self, gpa: u64, dst: &mut [u8]) -> Result<(), AccessError> {
        if let Some(host) = self.single_region(gpa, dst.len(), false) {
            // SAFETY: `single_region` found `host..host+len` inside one live region; see
            // the general case below for why a raw copy out of guest memory is sound.
            unsafe { std::ptr::copy_nonoverlapping(host, dst.as_mut_ptr(), dst.len()) };
            return Ok(());
        }
        self.check_range(gpa, dst.len(), false)?;
        self.walk(gpa, dst.len(), false, |host, offset, len| {
            // SAFETY: `walk` guarantees `host..host+len` lies inside a live region, and
            // `offset + len <= dst.len()`. Guest memory is never referenced, only copied, so a
            // concurrent writer can at worst produce torn bytes, which plain data tolerates.
            unsafe { std::ptr::copy_nonoverlapping(host, dst.as_mut_ptr().add(offset), len) }
        })
    }

    /// Copies `src` into guest memory at `gpa`.
    pub fn write_at(&self, gpa: u64, src: &[u8]) -> Result<(), AccessError> {
        if let Some(host) = self.single_region(gpa, src.len(), true) {
            // SAFETY: `single_region` found `host..host+len` inside one live, writable
            // region, and `src` is a host buffer, so they cannot overlap.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), host, src.len()) };
            return Ok(());
        }
        self.check_range(gpa, src.len(), true)?;
        self.walk(gpa, src.len(), true, |host, offset, len| {
            // SAFETY: as in `read_at`; the region is writable (checked above) and `src` is a
            // host buffer, so the two cannot overlap.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(offset), host, len) }
        })
    }

    /// Sets `len` bytes of guest memory at `gpa` to `value`.
    pub fn fill_at(&self, gpa: u64, value: u8, len: usize) -> Result<(), AccessError> {
        self.check_range(gpa, len, true)?;
        self.walk(gpa, len, true, |host, _, len| {
            // SAFETY: `host..host+len` lies inside a live, writable region.
            unsafe { std::ptr::write_bytes(host, value, len) }
        })
    }

    /// Reads a plain-data value from guest memory.
    pub fn read_plain<T: FromBytes + IntoBytes>(&self, gpa: u64) -> Result<T, AccessError> {
        let mut value = T::new_zeroed();
        self.read_at(gpa, value.as_mut_bytes())?;
        Ok(value)
    }

    /// Writes a plain-data value to guest memory.
    pub fn write_plain<T: IntoBytes + Immutable>(
        &self,
        gpa: u64,
        value: &T,
    ) -> Result<(), AccessError> {
        self.write_at(gpa, value.as_bytes())
    }

    /// Reads the `u16` at `gpa` (in host byte order) with one relaxed atomic load: the value
    /// is one the guest stored, never a mix of two stores, whatever the compiler makes of a
    /// copy. For fields another agent updates while we read them, such as virtqueue ring
    /// indices; order the access against others with `std::sync::atomic::fence`.
    ///
    /// Fails with [`AccessError::Misaligned`] if `gpa` or its host address is not 2-byte
    /// aligned, and as [`read_at`](Self::read_at) does if the memory is not there. Works on
    /// read-only regions (a relaxed load of 2 bytes never writes).
    pub fn read_atomic_u16(&self, gpa: u64) -> Result<u16, AccessError> {
        let host = self.atomic_u16_host(gpa, false)?;
        // SAFETY: `atomic_u16_host` checked that `host..host+2` lies inside one live region
        // (kept alive by `self` for the duration of this call) and is 2-byte aligned, the
        // alignment of `AtomicU16`. The reference is to an `AtomicU16`, whose `UnsafeCell`
        // asserts neither immutability nor exclusivity, so concurrent writes by the guest are
        // allowed; it lives only for this one load and is never handed out. A relaxed load
        // of 2 bytes is a plain load instruction, which is sound on read-only mappings too
        // (the "read-only memory" rules of `std::sync::atomic`).
        let atomic = unsafe { AtomicU16::from_ptr(host.cast()) };
        Ok(atomic.load(Ordering::Relaxed))
    }

    /// Writes `value` (in host byte order) to the `u16` at `gpa` with one relaxed atomic
    /// store, so the guest never sees half of it. Order it against other accesses with
    /// `std::sync::atomic::fence`.
    ///
    /// Fails with [`AccessError::Misaligned`] if `gpa` or its host address is not 2-byte
    /// aligned, and as [`write_at`](Self::write_at) does if the memory is not there or is
    /// read-only.
    pub fn write_atomic_u16(&self, gpa: u64, value: u16) -> Result<(), AccessError> {
        let host = self.atomic_u16_host(gpa, true)?;
        // SAFETY: as in `read_atomic_u16`; in addition the region is writable (checked by
        // `atomic_u16_host`), so the store cannot fault.
        let atomic = unsafe { AtomicU16::from_ptr(host.cast()) };
        atomic.store(value, Ordering::Relaxed);
        Ok(())
    }

    /// Reads the byte at `gpa` with one relaxed atomic load (see
    /// [`read_atomic_u16`](Self::read_atomic_u16)): for flags another process may be writing.
    pub fn read_atomic_u8(&self, gpa: u64) -> Result<u8, AccessError> {
        let host = self.atomic_host(gpa, 1, false)?;
        // SAFETY: as in `read_atomic_u16`, for a 1-byte `AtomicU8`, which needs no alignment.
        let atomic = unsafe { AtomicU8::from_ptr(host) };
        Ok(atomic.load(Ordering::Relaxed))
    }

    /// Writes the byte at `gpa` with one relaxed atomic store (see
    /// [`write_atomic_u16`](Self::write_atomic_u16)).
    pub fn write_atomic_u8(&self, gpa: u64, value: u8) -> Result<(), AccessError> {
        let host = self.atomic_host(gpa, 1, true)?;
        // SAFETY: as in `write_atomic_u16`, for a 1-byte `AtomicU8`.
        let atomic = unsafe { AtomicU8::from_ptr(host) };
        atomic.store(value, Ordering::Relaxed);
        Ok(())
    }

    /// Reads the `u64` at `gpa` (host byte order) with one relaxed atomic load, never a mix of
    /// two stores. Fails with [`AccessError::Misaligned`] unless `gpa` and its host address
    /// are 8-byte aligned; otherwise as [`read_atomic_u16`](Self::read_atomic_u16).
    pub fn read_atomic_u64(&self, gpa: u64) -> Result<u64, AccessError> {
        let host = self.atomic_host(gpa, 8, false)?;
        // SAFETY: as in `read_atomic_u16`; `atomic_host` checked the 8-byte alignment of
        // `AtomicU64` and that all 8 bytes lie in one live region.
        let atomic = unsafe { AtomicU64::from_ptr(host.cast()) };
        Ok(atomic.load(Ordering::Relaxed))
    }

    /// Writes the `u64` at `gpa` (host byte order) with one relaxed atomic store. Alignment
    /// and errors as [`read_atomic_u64`](Self::read_atomic_u64), plus read-only memory.
    pub fn write_atomic_u64(&self, gpa: u64, value: u64) -> Result<(), AccessError> {
        let host = self.atomic_host(gpa, 8, true)?;
        // SAFETY: as in `read_atomic_u64`; in addition the region is writable (checked by
        // `atomic_host`), so the store cannot fault.
        let atomic = unsafe { AtomicU64::from_ptr(host.cast()) };
        atomic.store(value, Ordering::Relaxed);
        Ok(())
    }

    /// The host address of the aligned `u16` at `gpa`, inside one region (writable, if
    /// `write`).
    fn atomic_u16_host(&self, gpa: u64, write: bool) -> Result<*mut u8, AccessError> {
        self.atomic_host(gpa, 2, write)
    }

    /// The host address of the naturally aligned `size`-byte value at `gpa` (`size` a power
    /// of two up to 8), inside one region (writable, if `write`).
    fn atomic_host(&self, gpa: u64, size: usize, write: bool) -> Result<*mut u8, AccessError> {
        let misaligned = AccessError::Misaligned {
            gpa,
            size: size as u64,
        };
        if !gpa.is_multiple_of(size as u64) {
            return Err(misaligned);
        }
        let Some(host) = self.single_region(gpa, size, write) else {
            // Not backed, read-only, or split between two regions (possible only where a
            // region starts or ends off a page boundary): the general check says which.
            self.check_range(gpa, size, write)?;
            return Err(misaligned);
        };
        // A region's guest and host addresses need not agree in alignment (an `external`
        // caller decides the host address, and a file region may start anywhere in a page).
        if !(host as usize).is_multiple_of(size) {
            return Err(misaligned);
        }
        Ok(host)
    }

    /// The host address of `gpa..gpa+len` when that lies inside one region (writable, if
    /// `write`): the common case, served without walking. `None` sends the caller to the
    /// general path, which also produces the error.
    fn single_region(&self, gpa: u64, len: usize, write: bool) -> Option<*mut u8> {
        let regions = &self.inner.regions;
        let region = &regions[regions.partition_point(|r| r.gpa <= gpa).checked_sub(1)?];
        let offset = gpa - region.gpa;
        let fits = offset.checked_add(len as u64)? <= region.len;
        // `wrapping_add` keeps this safe to compute; it only stays in bounds when `fits`.
        (fits && (region.writable || !write)).then(|| region.host.wrapping_add(offset as usize))
    }

    /// Calls `f(host_address, offset_into_access, run_len)` for each region-contiguous run of
    /// `gpa..gpa+len`, in order. Fails before calling `f` for a run that is not backed (so
    /// callers that need all-or-nothing validate first with `check_range`).
    pub(crate) fn walk(
        &self,
        gpa: u64,
        len: usize,
        write: bool,
        mut f: impl FnMut(*mut u8, usize, usize),
    ) -> Result<(), AccessError> {
        if len == 0 {
            return Ok(());
        }
        let len64 = len as u64;
        let end = gpa
            .checked_add(len64)
            .ok_or(AccessError::AddressOverflow { gpa, len: len64 })?;
        let regions = &self.inner.regions;
        let mut cur = gpa;
        while cur < end {
            let index = regions.partition_point(|r| r.gpa <= cur);
            let region = index
                .checked_sub(1)
                .map(|i| &regions[i])
                .filter(|r| cur < r.end())
                .ok_or(AccessError::OutOfRange { gpa, len: len64 })?;
            if write && !region.writable {
                return Err(AccessError::ReadOnly { gpa: cur });
            }
            let run = end.min(region.end()) - cur;
            // SAFETY: `cur - region.gpa < region.len`, and the region maps `len` bytes at
            // `host`, so the offset stays inside the allocation.
            let host = unsafe { region.host.add((cur - region.gpa) as usize) };
            f(host, (cur - gpa) as usize, run as usize);
            cur += run;
        }
        Ok(())
    }
}

/// Describes the regions of a [`GuestMemory`].
///
/// Memory this crate allocates ([`heap`](Self::heap), [`anonymous`](Self::anonymous)) is
/// whole pages at page-aligned guest addresses. Memory handed in ([`file`](Self::file),
/// [`external`](Self::external)) may be any non-empty byte range at any guest address, as a
/// vhost-user frontend may describe it (libblkio announces a 15120-byte ring region).
/// Regions may not overlap.
///
/// ```
/// use guestmem::GuestMemory;
///
/// let mem = GuestMemory::builder()
///     .heap(0, 1 << 20)?
///     .anonymous(1 << 32, 1 << 20)?
///     .build()?;
/// mem.write_plain(1 << 32, &7u32)?;
/// assert!(mem.read_plain::<u32>(1 << 21).is_err()); // the hole between the regions
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct GuestMemoryBuilder {
    regions: Vec<Region>,
}

impl GuestMemoryBuilder {
    /// Checks a region of whole pages at a page-aligned address; its length in bytes.
    fn check(gpa: u64, len: u64) -> Result<usize, BuildError> {
        if len == 0 || !gpa.is_multiple_of(PAGE_SIZE64) || !len.is_multiple_of(PAGE_SIZE64) {
            return Err(BuildError::Unaligned { gpa, len });
        }
        Self::check_bytes(gpa, len)
    }

    /// Checks a region of any non-empty length at any address; its length in bytes.
    fn check_bytes(gpa: u64, len: u64) -> Result<usize, BuildError> {
        if len == 0 {
            return Err(BuildError::Unaligned { gpa, len });
        }
        if gpa.checked_add(len).is_none() || len > isize::MAX as u64 {
            return Err(BuildError::TooLarge { gpa, len });
        }
        Ok(len as usize)
    }

    /// Adds zeroed heap memory.
    pub fn heap(mut self, gpa: u64, len: u64) -> Result<Self, BuildError> {
        let host_len = Self::check(gpa, len)?;
        let alloc = HeapAllocation::zeroed(host_len);
        self.regions.push(Region {
            gpa,
            len,
            host: alloc.as_ptr(),
            writable: true,
            _backing: Arc::new(Backing::Heap(alloc)),
        });
        Ok(self)
    }

    /// Adds zeroed, lazily committed anonymous memory (`mmap` with `MAP_NORESERVE`), backed by
    /// transparent huge pages where the kernel can: a region of 2 MiB or more is mapped at a
    /// host address equal to `gpa` modulo 2 MiB (so a 2 MiB-aligned region starts on a huge
    /// page boundary) and every region is advised `MADV_HUGEPAGE`, as QEMU and Cloud
    /// Hypervisor do for guest RAM by default (the advice matters where the system's THP
    /// setting is `madvise`; `never` overrides it, and a kernel without THP ignores it).
    ///
    /// Besides fewer TLB misses, huge pages make a guest buffer physically contiguous, so the
    /// block layer merges its pages into few segments: a 1 MiB request over scattered 4 KiB
    /// pages has 256 segments, which a device that takes 128 per request (a loop device, many
    /// others) must split in two.
    ///
    /// The price is the one THP always has: memory is committed in steps of up to 2 MiB, so
    /// a guest that touches one byte in each 2 MiB may commit all of it.
    pub fn anonymous(mut self, gpa: u64, len: u64) -> Result<Self, BuildError> {
        let host_len = Self::check(gpa, len)?;
        let huge = HUGE_PAGE_SIZE;
        // Room to move the start to a huge page boundary, if the region can hold one.
        let slack = if host_len >= huge {
            huge - PAGE_SIZE
        } else {
            0
        };
        let Some(mapped_len) = host_len.checked_add(slack) else {
            return Err(BuildError::TooLarge { gpa, len });
        };
        let ptr = Self::mmap(
            gpa,
            mapped_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )?
        .cast::<libc::c_void>();
        // Host and guest addresses equal modulo 2 MiB, so that a huge page of the guest is
        // one of the host (and one large page in a hypervisor's page tables). The offset is
        // page-aligned and below 2 MiB, so it fits in the slack.
        let start = ptr as usize;
        let aligned = if slack == 0 {
            start
        } else {
            start + ((gpa as usize).wrapping_sub(start) & (huge - 1))
        };
        let head = aligned - start;
        let tail = mapped_len - head - host_len;
        // SAFETY: both ranges lie within the mapping made above, outside the part kept, and
        // nothing refers to them. If munmap failed (ENOMEM splitting the mapping), the pages
        // would only stay mapped and unused.
        unsafe {
            if head > 0 {
                libc::munmap(ptr, head);
            }
            if tail > 0 {
                libc::munmap((aligned + host_len) as *mut libc::c_void, tail);
            }
        }
        let host = aligned as *mut u8;
        // Advice only: EINVAL without THP in the kernel changes nothing but the page size.
        // SAFETY: `host..host + host_len` is the mapping kept above; advice does not change
        // its contents.
        unsafe { libc::madvise(host.cast(), host_len, libc::MADV_HUGEPAGE) };
        self.push_mapping(gpa, host, host_len, true);
        Ok(self)
    }

    /// Adds a shared mapping of `len` bytes of `fd` starting at `file_offset`, as a VMM or a
    /// vhost-user backend maps the memory file descriptors it is given.
    ///
    /// `gpa`, `len` and `file_offset` need no alignment: the pages that hold
    /// `file_offset..file_offset + len` are mapped and the region is exactly the `len` bytes
    /// asked for, so an access past its end is refused even where the last page goes on.
    /// The mapping stays valid after `fd` is closed.
    ///
    /// Touching a page that lies wholly past the end of a regular file raises `SIGBUS`: a
    /// caller mapping memory it does not trust checks the file's size first.
    pub fn file(
        mut self,
        gpa: u64,
        len: u64,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        writable: bool,
    ) -> Result<Self, BuildError> {
        let host_len = Self::check_bytes(gpa, len)?;
        let too_large = || BuildError::TooLarge { gpa, len };
        // `mmap` takes a page-aligned offset: map from the page holding `file_offset` and
        // start the region `lead` bytes into the mapping.
        let lead = (file_offset % PAGE_SIZE64) as usize;
        let offset = libc::off_t::try_from(file_offset - lead as u64).map_err(|_| too_large())?;
        let mapped_len = host_len
            .checked_add(lead)
            .and_then(|n| n.checked_next_multiple_of(PAGE_SIZE))
            .filter(|&n| n <= isize::MAX as usize)
            .ok_or_else(too_large)?;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let base = Self::mmap(
            gpa,
            mapped_len,
            prot,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            offset,
        )?;
        let backing = Arc::new(Backing::Mapping(Mapping {
            ptr: base,
            len: mapped_len,
        }));
        self.regions.push(Region {
            gpa,
            len,
            // `lead < PAGE_SIZE <= mapped_len`: inside the mapping just made.
            host: base.wrapping_add(lead),
            writable,
            _backing: backing,
        });
        Ok(self)
    }

    /// A fresh mapping of `len` bytes chosen by the kernel, for the region at `gpa`.
    fn mmap(
        gpa: u64,
        len: usize,
        prot: i32,
        flags: i32,
        fd: i32,
        offset: libc::off_t,
    ) -> Result<*mut u8, BuildError> {
        // SAFETY: a fresh mapping chosen by the kernel (null hint) cannot alias any Rust
        // object; failure is reported as MAP_FAILED and handled below.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, offset) };
        if ptr == libc::MAP_FAILED {
            return Err(BuildError::Map {
                gpa,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(ptr.cast())
    }

    /// Adds the region at `gpa` backed by the mapping `host..host + len`, which it unmaps
    /// when the last handle goes.
    fn push_mapping(&mut self, gpa: u64, host: *mut u8, len: usize, writable: bool) {
        self.regions.push(Region {
            gpa,
            len: len as u64,
            host,
            writable,
            _backing: Arc::new(Backing::Mapping(Mapping { ptr: host, len })),
        });
    }

    /// Adds host memory mapped by someone else.
    ///
    /// `keep_alive` is held for as long as any handle to the memory exists; dropping it must
    /// be what releases the memory (if anything does). `gpa` and `len` need no alignment.
    ///
    /// # Safety
    ///
    /// `host..host+len` must be valid for reads (and writes, if `writable`) for as long as
    /// `keep_alive` lives, and must not be accessed through Rust references while any
    /// [`GuestMemory`] built from it exists.
    pub unsafe fn external(
        mut self,
        gpa: u64,
        len: u64,
        host: *mut u8,
        writable: bool,
        keep_alive: Arc<dyn Any + Send + Sync>,
    ) -> Result<Self, BuildError> {
        Self::check_bytes(gpa, len)?;
        self.regions.push(Region {
            gpa,
            len,
            host,
            writable,
            _backing: Arc::new(Backing::External(keep_alive)),
        });
        Ok(self)
    }

    /// Adds every region of `memory`, sharing its host memory: nothing is mapped or copied,
    /// and each region stays mapped while any handle that holds it lives. This is how guest
    /// memory changes at run time (a vhost-user frontend adding or removing a region): build
    /// the new set from the regions that stay, while requests in flight finish on the old
    /// handle, whose memory is still there.
    pub fn include(mut self, memory: &GuestMemory) -> Self {
        self.regions
            .extend(memory.inner.regions.iter().map(|r| Region {
                gpa: r.gpa,
                len: r.len,
                host: r.host,
                writable: r.writable,
                _backing: r._backing.clone(),
            }));
        self
    }

    /// Validates that no regions overlap and builds the handle.
    pub fn build(mut self) -> Result<GuestMemory, BuildError> {
        self.regions.sort_by_key(|r| r.gpa);
        for pair in self.regions.windows(2) {
            if pair[1].gpa < pair[0].end() {
                return Err(BuildError::Overlap { gpa: pair[1].gpa });
            }
        }
        Ok(GuestMemory {
            inner: Arc::new(Inner {
                regions: self.regions.into_boxed_slice(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PAGE_SIZE;

    #[test]
    fn edges_are_errors_not_panics() {
        let mem = GuestMemory::allocate(2 * PAGE_SIZE);
        let end = 2 * PAGE_SIZE64;
        let mut buf = [0u8; 16];
        assert!(mem.read_at(end - 16, &mut buf).is_ok());
        assert_eq!(
            mem.read_at(end - 15, &mut buf),
            Err(AccessError::OutOfRange {
                gpa: end - 15,
                len: 16
            })
        );
        assert_eq!(
            mem.read_at(u64::MAX - 7, &mut buf),
            Err(AccessError::AddressOverflow {
                gpa: u64::MAX - 7,
                len: 16
            })
        );
        assert!(mem.read_at(u64::MAX, &mut []).is_ok());
        assert!(mem.fill_at(end, 1, 1).is_err());
        assert!(GuestMemory::empty().read_plain::<u8>(0).is_err());
    }

    #[test]
    fn accesses_span_adjacent_regions() {
        let mem = GuestMemory::builder()
            .heap(0, PAGE_SIZE64)
            .unwrap()
            .anonymous(PAGE_SIZE64, PAGE_SIZE64)
            .unwrap()
            .build()
            .unwrap();
        let data: Vec<u8> = (0..64).collect();
        mem.write_at(PAGE_SIZE64 - 32, &data).unwrap();
        let mut back = [0u8; 64];
        mem.read_at(PAGE_SIZE64 - 32, &mut back).unwrap();
        assert_eq!(&back[..], &data[..]);
    }

    #[test]
    fn host_regions_are_what_lock_resolves_to() {
        let mem = GuestMemory::builder()
            .heap(0, 2 * PAGE_SIZE64)
            .unwrap()
            .anonymous(4 * PAGE_SIZE64, PAGE_SIZE64)
            .unwrap()
            .build()
            .unwrap();
        let regions: Vec<_> = mem.host_regions().collect();
        assert_eq!(regions.len(), 2);
        for (gpa, host, writable) in regions {
            assert!(writable);
            let gpns: Vec<u64> = (0..host.len() as u64 / PAGE_SIZE64)
                .map(|p| gpa / PAGE_SIZE64 + p)
                .collect();
            let range = crate::PagedRange::new(0, host.len(), &gpns).unwrap();
            assert_eq!(mem.lock(range, true).unwrap().io_buffers(), [host]);
        }
        assert_eq!(GuestMemory::empty().host_regions().count(), 0);
    }

    /// The `VmFlags` line of the mapping that holds `host`, from `/proc/self/smaps` (the
    /// kernel may have merged it with a neighbour that has the same flags).
    fn vm_flags(host: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        // A mapping's header: "start-end perms offset dev inode [path]", in hex.
        let holds = |line: &str| {
            let range = line.split_whitespace().next().unwrap_or_default();
            let Some((start, end)) = range.split_once('-') else {
                return false;
            };
            match (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            ) {
                (Ok(start), Ok(end)) => (start..end).contains(&host),
                _ => false,
            }
        };
        let mut lines = smaps.lines().skip_while(|l| !holds(l));
        assert!(lines.next().is_some(), "no mapping holds {host:#x}");
        lines
            .find_map(|l| l.strip_prefix("VmFlags:"))
            .unwrap()
            .to_owned()
    }

    #[test]
    fn anonymous_memory_asks_for_huge_pages() {
        let huge = HUGE_PAGE_SIZE as u64;
        let mem = GuestMemory::builder()
            .anonymous(0, 2 * huge)
            .unwrap()
            .anonymous(4 * huge, PAGE_SIZE64)
            .unwrap()
            .anonymous(8 * huge + huge / 2, huge)
            .unwrap()
            .build()
            .unwrap();
        let hosts: Vec<usize> = mem
            .host_regions()
            .map(|(_, host, _)| host.as_ptr() as usize)
            .collect();
        // A region of 2 MiB or more lies at its guest address modulo 2 MiB.
        assert_eq!(hosts[0] % HUGE_PAGE_SIZE, 0);
        assert_eq!(hosts[2] % HUGE_PAGE_SIZE, HUGE_PAGE_SIZE / 2);
        mem.write_plain(9 * huge + huge / 2 - 1, &5u8).unwrap();
        // Every byte is still usable, the last one included.
        mem.write_plain(2 * huge - 1, &7u8).unwrap();
        assert_eq!(mem.read_plain::<u8>(2 * huge - 1).unwrap(), 7);
        mem.write_plain(4 * huge, &9u8).unwrap();
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            test_skip::skip_optional("the advice check: this kernel has no transparent huge pages");
            return;
        }
        // `hg`: advised MADV_HUGEPAGE.
        for host in hosts {
            let flags = vm_flags(host);
            assert!(flags.split_whitespace().any(|f| f == "hg"), "{flags}");
        }
    }

    #[test]
    fn atomic_u16_accesses_are_checked() {
        let mem = GuestMemory::builder()
            .heap(0, PAGE_SIZE64)
            .unwrap()
            .build()
            .unwrap();
        mem.write_atomic_u16(0x10, 0xabcd).unwrap();
        assert_eq!(mem.read_atomic_u16(0x10).unwrap(), 0xabcd);
        assert_eq!(mem.read_plain::<u16>(0x10).unwrap(), 0xabcd);
        let misaligned = AccessError::Misaligned { gpa: 0x11, size: 2 };
        assert_eq!(mem.read_atomic_u16(0x11), Err(misaligned.clone()));
        assert_eq!(mem.write_atomic_u16(0x11, 1), Err(misaligned));
        assert_eq!(
            mem.read_atomic_u16(PAGE_SIZE64),
            Err(AccessError::OutOfRange {
                gpa: PAGE_SIZE64,
                len: 2
            })
        );
        assert!(mem.read_atomic_u16(u64::MAX - 1).is_err());
    }

    #[test]
    fn atomic_u8_and_u64_accesses_are_checked() {
        let mem = GuestMemory::builder()
            .heap(0, PAGE_SIZE64)
            .unwrap()
            .build()
            .unwrap();
        mem.write_atomic_u64(0x18, 0x0123_4567_89ab_cdef).unwrap();
        assert_eq!(mem.read_atomic_u64(0x18).unwrap(), 0x0123_4567_89ab_cdef);
        assert_eq!(mem.read_plain::<u64>(0x18).unwrap(), 0x0123_4567_89ab_cdef);
        mem.write_atomic_u8(0x21, 7).unwrap();
        assert_eq!(mem.read_atomic_u8(0x21).unwrap(), 7);
        let misaligned = AccessError::Misaligned { gpa: 0x14, size: 8 };
        assert_eq!(mem.read_atomic_u64(0x14), Err(misaligned.clone()));
        assert_eq!(mem.write_atomic_u64(0x14, 1), Err(misaligned));
        assert_eq!(
            mem.read_atomic_u64(PAGE_SIZE64 - 8 + 8),
            Err(AccessError::OutOfRange {
                gpa: PAGE_SIZE64,
                len: 8
            })
        );
        assert!(mem.read_atomic_u8(PAGE_SIZE64).is_err());
        assert!(mem.read_atomic_u64(u64::MAX - 7).is_err());
    }

    #[test]
    fn atomic_u16_on_read_only_memory() {
        let file = tempfile_with_len(PAGE_SIZE);
        std::os::unix::fs::FileExt::write_all_at(&file, &0x1234u16.to_ne_bytes(), 8).unwrap();
        let mem = GuestMemory::builder()
            .file(0, PAGE_SIZE64, std::os::fd::AsFd::as_fd(&file), 0, false)
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(mem.read_atomic_u16(8).unwrap(), 0x1234);
        assert_eq!(
            mem.write_atomic_u16(8, 1),
            Err(AccessError::ReadOnly { gpa: 8 })
        );
    }

    /// A writer flipping a `u16` between 0x00ff and 0xff00 while a reader loads it: the
    /// reader only ever sees one of the two (a torn access would show 0x0000 or 0xffff).
    #[test]
    fn atomic_u16_is_never_torn() {
        use std::sync::atomic::AtomicBool;
        let mem = GuestMemory::allocate(PAGE_SIZE);
        let gpa = 0x7fe;
        mem.write_atomic_u16(gpa, 0x00ff).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = std::thread::spawn({
            let (mem, stop) = (mem.clone(), stop.clone());
            move || {
                let mut value = 0x00ffu16;
                while !stop.load(Ordering::Relaxed) {
                    value = value.rotate_left(8);
                    mem.write_atomic_u16(gpa, value).unwrap();
                }
            }
        });
        for _ in 0..200_000 {
            let value = mem.read_atomic_u16(gpa).unwrap();
            assert!(value == 0x00ff || value == 0xff00, "torn: {value:#06x}");
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
    }

    #[test]
    fn failed_write_copies_nothing() {
        let mem = GuestMemory::allocate(PAGE_SIZE);
        assert!(mem.write_at(PAGE_SIZE64 - 4, &[1; 8]).is_err());
        assert_eq!(mem.read_plain::<u32>(PAGE_SIZE64 - 4).unwrap(), 0);
    }

    #[test]
    fn builder_rejects_bad_regions() {
        assert!(matches!(
            GuestMemory::builder().heap(1, PAGE_SIZE64),
            Err(BuildError::Unaligned { .. })
        ));
        assert!(matches!(
            GuestMemory::builder().heap(0, 0),
            Err(BuildError::Unaligned { .. })
        ));
        assert!(matches!(
            GuestMemory::builder().anonymous(u64::MAX - PAGE_SIZE64 + 1, 2 * PAGE_SIZE64),
            Err(BuildError::TooLarge { .. })
        ));
        let overlap = GuestMemory::builder()
            .heap(0, 2 * PAGE_SIZE64)
            .unwrap()
            .heap(PAGE_SIZE64, PAGE_SIZE64)
            .unwrap()
            .build();
        assert!(matches!(overlap, Err(BuildError::Overlap { .. })));
    }

    #[test]
    fn read_only_file_mapping_refuses_writes() {
        let file = tempfile_with_len(PAGE_SIZE);
        let fd = std::os::fd::AsFd::as_fd(&file);
        let mem = GuestMemory::builder()
            .file(0, PAGE_SIZE64, fd, 0, false)
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(mem.read_plain::<u64>(8).unwrap(), 0);
        assert_eq!(
            mem.write_plain(8, &1u64),
            Err(AccessError::ReadOnly { gpa: 8 })
        );
    }

    #[test]
    fn shared_file_mapping_sees_file_data() {
        use std::os::unix::fs::FileExt;
        let file = tempfile_with_len(2 * PAGE_SIZE);
        file.write_all_at(b"hello", PAGE_SIZE64 + 3).unwrap();
        let mem = GuestMemory::builder()
            .file(
                0x10000,
                PAGE_SIZE64,
                std::os::fd::AsFd::as_fd(&file),
                PAGE_SIZE64,
                true,
            )
            .unwrap()
            .build()
            .unwrap();
        let mut buf = [0; 5];
        mem.read_at(0x10003, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        mem.write_at(0x10000, b"HI").unwrap();
        let mut back = [0; 2];
        file.read_exact_at(&mut back, PAGE_SIZE64).unwrap();
        assert_eq!(&back, b"HI");
    }

    /// libblkio announces its rings as one region of exactly the bytes they need (15120 for
    /// a 256-entry queue), at the address it has them mapped: a region that is not a whole
    /// number of pages. It used to be refused as unaligned.
    #[test]
    fn a_file_region_of_any_size_is_exactly_that_size() {
        use std::os::unix::fs::FileExt;
        const RING_BYTES: u64 = 15120;
        let file = tempfile_with_len(RING_BYTES as usize);
        let gpa = 0x7f12_3456_7000;
        let mem = GuestMemory::builder()
            .file(gpa, RING_BYTES, std::os::fd::AsFd::as_fd(&file), 0, true)
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(mem.regions().collect::<Vec<_>>(), [(gpa, RING_BYTES, true)]);
        mem.write_plain(gpa + RING_BYTES - 2, &0xbeefu16).unwrap();
        let mut back = [0u8; 2];
        file.read_exact_at(&mut back, RING_BYTES - 2).unwrap();
        assert_eq!(u16::from_ne_bytes(back), 0xbeef);
        // The last page goes on past the region; the region does not.
        let end = gpa + RING_BYTES;
        assert_eq!(
            mem.read_plain::<u8>(end),
            Err(AccessError::OutOfRange { gpa: end, len: 1 })
        );
        assert!(mem.read_plain::<u32>(end - 2).is_err(), "straddles the end");
        assert!(mem.fill_at(end - 1, 0, 2).is_err());
        assert_eq!(mem.read_atomic_u16(end - 2).unwrap(), 0xbeef);
        assert!(mem.read_atomic_u16(end).is_err());
        let (_, host, _) = mem.host_regions().next().unwrap();
        assert_eq!(host.len(), RING_BYTES as usize);
    }

    /// A region may start anywhere in its file and at any guest address: byte `i` of the
    /// region is byte `file_offset + i` of the file.
    #[test]
    fn a_file_region_honours_an_unaligned_offset_and_address() {
        use std::os::unix::fs::FileExt;
        let file = tempfile_with_len(3 * PAGE_SIZE);
        let (gpa, offset, len) = (0x10_0064, PAGE_SIZE64 - 3, PAGE_SIZE64 + 10);
        let mem = GuestMemory::builder()
            .file(gpa, len, std::os::fd::AsFd::as_fd(&file), offset, true)
            .unwrap()
            .heap(0, PAGE_SIZE64)
            .unwrap()
            .build()
            .unwrap();
        let data: Vec<u8> = (0..len).map(|i| i as u8 ^ 0x5a).collect();
        mem.write_at(gpa, &data).unwrap();
        let mut back = vec![0; data.len()];
        file.read_exact_at(&mut back, offset).unwrap();
        assert_eq!(back, data);
        let mut before = [1u8; 3];
        file.read_exact_at(&mut before, offset - 3).unwrap();
        assert_eq!(before, [0; 3], "nothing written before the region");
        assert!(mem.read_plain::<u8>(gpa - 1).is_err());
        assert!(mem.read_plain::<u8>(gpa + len).is_err());
        // Locking a page-list range that covers the region's first, partial page.
        let gpns = [gpa / PAGE_SIZE64];
        let range = crate::PagedRange::new((gpa % PAGE_SIZE64) as usize, 16, &gpns).unwrap();
        assert_eq!(mem.lock(range, false).unwrap().len(), 16);
        let range = crate::PagedRange::new(0, 16, &gpns).unwrap();
        assert!(mem.lock(range, false).is_err(), "bytes before the region");
    }

    #[test]
    fn bad_file_regions_are_errors() {
        let file = tempfile_with_len(PAGE_SIZE);
        let fd = std::os::fd::AsFd::as_fd(&file);
        let build = |gpa, len, offset| GuestMemory::builder().file(gpa, len, fd, offset, true);
        assert!(matches!(
            build(0, 0, 0),
            Err(BuildError::Unaligned { len: 0, .. })
        ));
        assert!(matches!(
            build(u64::MAX - 10, 100, 0),
            Err(BuildError::TooLarge { .. })
        ));
        assert!(matches!(
            build(0, u64::MAX, 0),
            Err(BuildError::TooLarge { .. })
        ));
        assert!(matches!(
            build(0, isize::MAX as u64 - 10, PAGE_SIZE64 - 1),
            Err(BuildError::TooLarge { .. })
        ));
        assert!(matches!(
            build(0, PAGE_SIZE64, u64::MAX - 10),
            Err(BuildError::TooLarge { .. })
        ));
    }

    /// Regions taken over by another handle keep their memory for both: the old handle (what
    /// requests in flight hold) keeps working after the new one dropped a region, and the
    /// new one after the old is gone.
    #[test]
    fn included_regions_share_their_memory() {
        let file = tempfile_with_len(2 * PAGE_SIZE);
        let fd = std::os::fd::AsFd::as_fd(&file);
        let first = GuestMemory::builder()
            .file(0, PAGE_SIZE64, fd, 0, true)
            .unwrap()
            .build()
            .unwrap();
        let second = GuestMemory::builder()
            .file(0x10_0000, 100, fd, PAGE_SIZE64, true)
            .unwrap()
            .build()
            .unwrap();
        let both = GuestMemory::builder()
            .include(&second)
            .include(&first)
            .build()
            .unwrap();
        assert_eq!(
            both.regions().collect::<Vec<_>>(),
            [(0, PAGE_SIZE64, true), (0x10_0000, 100, true)]
        );
        both.write_plain(0x10, &7u64).unwrap();
        assert_eq!(first.read_plain::<u64>(0x10).unwrap(), 7);
        // The table without the second region; the old one still reaches it.
        let only_first = GuestMemory::builder().include(&first).build().unwrap();
        drop((first, second));
        assert!(only_first.read_plain::<u8>(0x10_0000).is_err());
        both.write_plain(0x10_0000 + 92, &9u64).unwrap();
        assert_eq!(both.read_plain::<u64>(0x10_0000 + 92).unwrap(), 9);
        drop(both);
        assert_eq!(only_first.read_plain::<u64>(0x10).unwrap(), 7);
        // Including the same region twice is an overlap.
        let twice = GuestMemory::builder()
            .include(&only_first)
            .include(&only_first)
            .build();
        assert!(matches!(twice, Err(BuildError::Overlap { gpa: 0 })));
    }

    fn tempfile_with_len(len: usize) -> std::fs::File {
        let dir = std::env::temp_dir();
        let path = dir.join(format!(
            "guestmem-test-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file.set_len(len as u64).unwrap();
        file
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed)
    }
}
