//! `guestmem::PagedRange` over arbitrary page lists, offsets and lengths: construction,
//! `try_subrange`, `runs`, and readers and writers streaming through guest memory with
//! holes.
//!
//! Oracle: a model that places byte `i` of a range at `gpns[(offset + i) / 4096] * 4096 +
//! (offset + i) % 4096`, computed in 128 bits. A range exists exactly when it fits its pages;
//! a subrange equals the range built directly at the summed offset; the runs are the model's
//! bytes merged over consecutive page numbers, failing exactly where an address would
//! pass 2^64; a reader returns the model memory's bytes and a writer changes exactly the
//! model's bytes, each all or nothing (a failed access consumes and changes nothing).

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use guestmem::{GuestMemory, MemoryRead, MemoryWrite, PAGE_SIZE, PagedRange};
use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;

/// Guest memory: pages 0-3 and 8-11, a hole between them and nothing after.
const MAPPED: [std::ops::Range<u64>; 2] = [0..4, 8..12];
const MODEL_PAGES: usize = 12;

/// A page number: usually one near the memory (mapped, in the hole, past the end), sometimes
/// one at the top of the address space, where addresses overflow.
#[derive(Debug, Arbitrary)]
enum Gpn {
    Near(u8),
    Top(u8),
    Raw(u64),
}

impl Gpn {
    fn get(&self) -> u64 {
        match *self {
            Gpn::Near(n) => u64::from(n % 16),
            Gpn::Top(n) => (u64::MAX >> 12) - 2 + u64::from(n % 8),
            Gpn::Raw(n) => n,
        }
    }
}

/// A byte count or offset: usually small or near a page boundary, sometimes anything.
#[derive(Debug, Arbitrary)]
enum Len {
    Small(u16),
    Pages(u8, i8),
    Raw(usize),
}

impl Len {
    fn get(&self) -> usize {
        match *self {
            Len::Small(n) => usize::from(n) % (3 * PAGE_SIZE),
            Len::Pages(pages, delta) => {
                (usize::from(pages % 20) * PAGE_SIZE).saturating_add_signed(delta.into())
            }
            Len::Raw(n) => n,
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Step {
    Subrange { offset: Len, len: Len },
    Read(Len),
    Skip(Len),
    Write { len: Len, seed: u8 },
    Fill { len: Len, value: u8 },
}

struct Model {
    mem: GuestMemory,
    /// What the mapped pages hold, indexed by page number (hole pages stay unused).
    bytes: Vec<u8>,
}

thread_local! {
    /// Built once: inputs share the memory and the model keeps up with every write.
    static MODEL: RefCell<Model> = RefCell::new({
        let mut builder = GuestMemory::builder();
        for pages in MAPPED {
            builder = builder.heap(pages.start * PAGE_SIZE as u64, (pages.end - pages.start) * PAGE_SIZE as u64).unwrap();
        }
        Model { mem: builder.build().unwrap(), bytes: vec![0; MODEL_PAGES * PAGE_SIZE] }
    });
}

/// Bytes 0, 1, 2, ... (wrapping), enough for any write at any seed: write data is a window
/// of it, so that no input builds its data byte by byte.
fn counting() -> &'static [u8] {
    static COUNTING: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    COUNTING.get_or_init(|| (0..4 * PAGE_SIZE + 256).map(|i| i as u8).collect())
}

fn mapped(gpn: u64) -> bool {
    MAPPED.iter().any(|pages| pages.contains(&gpn))
}

/// Where byte `i` of the range `offset`, `gpns` lies (128 bits: never overflows).
fn position(gpns: &[u64], offset: usize, i: usize) -> (u64, u128) {
    let at = offset + i;
    let gpn = gpns[at / PAGE_SIZE];
    (
        gpn,
        u128::from(gpn) * PAGE_SIZE as u128 + (at % PAGE_SIZE) as u128,
    )
}

/// The pieces of the `len` bytes at `start` of the range `gpns`, one per page they touch:
/// `(offset into the bytes, model address, length)`. Only for mapped pages.
fn pieces(gpns: &[u64], start: usize, len: usize) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < len {
        let piece = (PAGE_SIZE - (start + at) % PAGE_SIZE).min(len - at);
        out.push((at, position(gpns, start, at).1 as usize, piece));
        at += piece;
    }
    out
}

/// The model's runs of `len` bytes at `offset` into `gpns`: `Ok((gpa, len))`, and one `Err`
/// for the first run whose end passes 2^64, after which nothing follows.
fn model_runs(gpns: &[u64], offset: usize, len: usize) -> Vec<Result<(u64, usize), ()>> {
    let mut runs: Vec<(u128, usize)> = Vec::new();
    let mut at = 0;
    while at < len {
        let page_left = PAGE_SIZE - (offset + at) % PAGE_SIZE;
        let piece = page_left.min(len - at);
        let (gpn, gpa) = position(gpns, offset, at);
        let merges = at > 0 && {
            let (previous, _) = position(gpns, offset, at - 1);
            u128::from(previous) + 1 == u128::from(gpn)
        };
        match runs.last_mut() {
            Some(run) if merges => run.1 += piece,
            _ => runs.push((gpa, piece)),
        }
        at += piece;
    }
    let mut out = Vec::new();
    for (gpa, len) in runs {
        if gpa + len as u128 > u128::from(u64::MAX) {
            out.push(Err(()));
            break;
        }
        out.push(Ok((gpa as u64, len)));
    }
    out
}

/// Whether the `len` bytes at `start` of the range `gpns` all lie in mapped memory (and so
/// in the model).
fn accessible(gpns: &[u64], start: usize, len: usize) -> bool {
    len == 0 || (start / PAGE_SIZE..=(start + len - 1) / PAGE_SIZE).all(|page| mapped(gpns[page]))
}

fn check_range(range: &PagedRange<'_>, gpns: &[u64], offset: usize, len: usize) {
    assert_eq!(range.len(), len);
    assert_eq!(range.is_empty(), len == 0);
    if len == 0 {
        assert_eq!(*range, PagedRange::empty());
        return;
    }
    let first = offset / PAGE_SIZE;
    let last = (offset + len - 1) / PAGE_SIZE;
    assert_eq!(range.offset(), offset % PAGE_SIZE);
    assert_eq!(range.gpns(), &gpns[first..=last], "only the touched pages");
    let runs: Vec<_> = range.runs().map(|run| run.map_err(|_| ())).collect();
    assert_eq!(runs, model_runs(gpns, offset, len), "runs of {range:?}");
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let (Ok(gpns), Ok(offset), Ok(len)) = (
        u.arbitrary::<Vec<Gpn>>(),
        u.arbitrary::<Len>(),
        u.arbitrary::<Len>(),
    ) else {
        return;
    };
    let gpns: Vec<u64> = gpns.iter().take(64).map(Gpn::get).collect();
    let (offset, len) = (offset.get(), len.get());
    let fits = offset
        .checked_add(len)
        .is_some_and(|end| end <= gpns.len() * PAGE_SIZE);
    let range = PagedRange::new(offset, len, &gpns);
    assert_eq!(
        range.is_some(),
        fits,
        "new({offset}, {len}) over {} pages",
        gpns.len()
    );
    let Some(range) = range else { return };
    check_range(&range, &gpns, offset, len);

    MODEL.with_borrow_mut(|model| {
        let Model { mem, bytes } = model;
        // How far the reader and the writer have gone into the range.
        let mut reader = range.reader(mem);
        let mut read_at = 0;
        let mut writer = range.writer(mem);
        let mut written = 0;
        while !u.is_empty() {
            let Ok(step) = Step::arbitrary(&mut u) else {
                break;
            };
            match step {
                Step::Subrange {
                    offset: sub_offset,
                    len: sub_len,
                } => {
                    let (sub_offset, sub_len) = (sub_offset.get(), sub_len.get());
                    let sub = range.try_subrange(sub_offset, sub_len);
                    let fits = sub_offset
                        .checked_add(sub_len)
                        .is_some_and(|end| end <= len);
                    assert_eq!(
                        sub.is_some(),
                        fits,
                        "subrange({sub_offset}, {sub_len}) of {len} bytes"
                    );
                    if let Some(sub) = sub {
                        assert_eq!(
                            Some(sub),
                            PagedRange::new(offset + sub_offset, sub_len, &gpns)
                        );
                        check_range(&sub, &gpns, offset + sub_offset, sub_len);
                    }
                }
                Step::Read(n) => {
                    let n = n.get() % (4 * PAGE_SIZE);
                    let mut buf = vec![0u8; n];
                    let ok = n <= len - read_at && accessible(&gpns, offset + read_at, n);
                    let result = reader.read(&mut buf).map(|_| ());
                    assert_eq!(result.is_ok(), ok, "read {n} at {read_at}: {result:?}");
                    if ok {
                        for (at, gpa, piece) in pieces(&gpns, offset + read_at, n) {
                            assert!(
                                buf[at..at + piece] == bytes[gpa..gpa + piece],
                                "read {n} at {read_at}: wrong bytes at {at}"
                            );
                        }
                        read_at += n;
                    }
                    assert_eq!(
                        reader.len(),
                        len - read_at,
                        "a failed read consumes nothing"
                    );
                }
                Step::Skip(n) => {
                    let n = n.get();
                    let ok = n <= len - read_at;
                    assert_eq!(reader.skip(n).is_ok(), ok);
                    if ok {
                        read_at += n;
                    }
                    assert_eq!(reader.remaining().len(), len - read_at);
                }
                Step::Write { len: n, seed } => {
                    let n = n.get() % (4 * PAGE_SIZE);
                    let data = &counting()[usize::from(seed)..usize::from(seed) + n];
                    let ok = n <= len - written && accessible(&gpns, offset + written, n);
                    let result = writer.write(data);
                    assert_eq!(result.is_ok(), ok, "write {n} at {written}: {result:?}");
                    if ok {
                        for (at, gpa, piece) in pieces(&gpns, offset + written, n) {
                            bytes[gpa..gpa + piece].copy_from_slice(&data[at..at + piece]);
                        }
                        written += n;
                    }
                    check_memory(mem, bytes);
                    assert_eq!(
                        writer.len(),
                        len - written,
                        "a failed write consumes nothing"
                    );
                }
                Step::Fill { len: n, value } => {
                    let n = n.get() % (4 * PAGE_SIZE);
                    let ok = n <= len - written && accessible(&gpns, offset + written, n);
                    let result = writer.fill(value, n);
                    assert_eq!(result.is_ok(), ok, "fill {n} at {written}: {result:?}");
                    if ok {
                        for (_, gpa, piece) in pieces(&gpns, offset + written, n) {
                            bytes[gpa..gpa + piece].fill(value);
                        }
                        written += n;
                    }
                    check_memory(mem, bytes);
                    assert_eq!(writer.len(), len - written);
                }
            }
        }
    });
});

/// Guest memory holds the model's bytes (which a failed write did not change).
fn check_memory(mem: &GuestMemory, bytes: &[u8]) {
    let mut actual = vec![0u8; PAGE_SIZE];
    for pages in MAPPED {
        for gpn in pages {
            let at = gpn as usize * PAGE_SIZE;
            mem.read_at(at as u64, &mut actual).unwrap();
            assert!(
                actual == bytes[at..at + PAGE_SIZE],
                "page {gpn} differs from the model"
            );
        }
    }
}
