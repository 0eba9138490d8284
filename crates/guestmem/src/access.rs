//! Streaming reads and writes through paged ranges.

use crate::{AccessError, GuestMemory, PagedRange};
use zerocopy::{FromBytes, IntoBytes};

/// A source of bytes consumed front to back.
pub trait MemoryRead {
    /// Fills `data` from the front of the source and advances past it. Fails, consuming
    /// nothing, if fewer than `data.len()` bytes remain.
    fn read(&mut self, data: &mut [u8]) -> Result<&mut Self, AccessError>;

    /// Advances past `len` bytes.
    fn skip(&mut self, len: usize) -> Result<&mut Self, AccessError>;

    /// Bytes remaining.
    fn len(&self) -> usize;

    /// Whether no bytes remain.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads a plain-data value.
    fn read_plain<T: FromBytes + IntoBytes>(&mut self) -> Result<T, AccessError>
    where
        Self: Sized,
    {
        let mut value = T::new_zeroed();
        self.read(value.as_mut_bytes())?;
        Ok(value)
    }
}

/// A sink of bytes filled front to back.
pub trait MemoryWrite {
    /// Writes `data` at the front of the sink and advances past it. Fails, writing nothing,
    /// if fewer than `data.len()` bytes remain.
    fn write(&mut self, data: &[u8]) -> Result<(), AccessError>;

    /// Writes `len` copies of `value`.
    fn fill(&mut self, value: u8, len: usize) -> Result<(), AccessError>;

    /// Bytes remaining.
    fn len(&self) -> usize;

    /// Whether no bytes remain.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes `len` zero bytes.
    fn zero(&mut self, len: usize) -> Result<(), AccessError> {
        self.fill(0, len)
    }
}

fn exhausted(requested: usize, remaining: usize) -> AccessError {
    AccessError::RangeExhausted {
        requested,
        remaining,
    }
}

/// Validates every run of `range` against `mem` so that a following copy cannot stop half way.
fn check_runs(mem: &GuestMemory, range: PagedRange<'_>, write: bool) -> Result<(), AccessError> {
    for run in range.runs() {
        let (gpa, len) = run?;
        mem.check_range(gpa, len, write)?;
    }
    Ok(())
}

/// Reads guest memory through a [`PagedRange`].
#[derive(Debug, Clone)]
pub struct PagedRangeReader<'a> {
    mem: &'a GuestMemory,
    range: PagedRange<'a>,
}

impl<'a> PagedRangeReader<'a> {
    /// A reader over `range` of `mem`.
    pub fn new(mem: &'a GuestMemory, range: PagedRange<'a>) -> Self {
        Self { mem, range }
    }

    /// What remains to be read.
    pub fn remaining(&self) -> PagedRange<'a> {
        self.range
    }
}

impl MemoryRead for PagedRangeReader<'_> {
    fn read(&mut self, data: &mut [u8]) -> Result<&mut Self, AccessError> {
        let range = self
            .range
            .try_subrange(0, data.len())
            .ok_or_else(|| exhausted(data.len(), self.range.len()))?;
        let mut offset = 0;
        for run in range.runs() {
            let (gpa, len) = run?;
            self.mem.read_at(gpa, &mut data[offset..offset + len])?;
            offset += len;
        }
        self.range = self
            .range
            .subrange(data.len(), self.range.len() - data.len());
        Ok(self)
    }

    fn skip(&mut self, len: usize) -> Result<&mut Self, AccessError> {
        let rest = self
            .range
            .len()
            .checked_sub(len)
            .ok_or_else(|| exhausted(len, self.range.len()))?;
        self.range = self.range.subrange(len, rest);
        Ok(self)
    }

    fn len(&self) -> usize {
        self.range.len()
    }
}

/// Writes guest memory through a [`PagedRange`].
#[derive(Debug, Clone)]
pub struct PagedRangeWriter<'a> {
    mem: &'a GuestMemory,
    range: PagedRange<'a>,
}

impl<'a> PagedRangeWriter<'a> {
    /// A writer over `range` of `mem`.
    pub fn new(mem: &'a GuestMemory, range: PagedRange<'a>) -> Self {
        Self { mem, range }
    }

    /// What remains to be written.
    pub fn remaining(&self) -> PagedRange<'a> {
        self.range
    }

    /// The next `len` bytes, validated so that writing them cannot stop half way: a single
    /// run is validated by its (all-or-nothing) copy, several are checked up front.
    fn prefix(&self, len: usize) -> Result<PagedRange<'a>, AccessError> {
        let range = self
            .range
            .try_subrange(0, len)
            .ok_or_else(|| exhausted(len, self.range.len()))?;
        if range.runs().nth(1).is_some() {
            check_runs(self.mem, range, true)?;
        }
        Ok(range)
    }

    fn advance(&mut self, len: usize) {
        self.range = self.range.subrange(len, self.range.len() - len);
    }
}

impl MemoryWrite for PagedRangeWriter<'_> {
    fn write(&mut self, data: &[u8]) -> Result<(), AccessError> {
        let range = self.prefix(data.len())?;
        let mut offset = 0;
        for run in range.runs() {
            let (gpa, len) = run?;
            self.mem.write_at(gpa, &data[offset..offset + len])?;
            offset += len;
        }
        self.advance(data.len());
        Ok(())
    }

    fn fill(&mut self, value: u8, len: usize) -> Result<(), AccessError> {
        let range = self.prefix(len)?;
        for run in range.runs() {
            let (gpa, len) = run?;
            self.mem.fill_at(gpa, value, len)?;
        }
        self.advance(len);
        Ok(())
    }

    fn len(&self) -> usize {
        self.range.len()
    }
}

impl MemoryRead for &[u8] {
    fn read(&mut self, data: &mut [u8]) -> Result<&mut Self, AccessError> {
        let (head, tail) = self
            .split_at_checked(data.len())
            .ok_or_else(|| exhausted(data.len(), self.len()))?;
        data.copy_from_slice(head);
        *self = tail;
        Ok(self)
    }

    fn skip(&mut self, len: usize) -> Result<&mut Self, AccessError> {
        *self = self.get(len..).ok_or_else(|| exhausted(len, self.len()))?;
        Ok(self)
    }

    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
}

impl MemoryWrite for &mut [u8] {
    fn write(&mut self, data: &[u8]) -> Result<(), AccessError> {
        let len = <[u8]>::len(self);
        if data.len() > len {
            return Err(exhausted(data.len(), len));
        }
        let (head, tail) = std::mem::take(self).split_at_mut(data.len());
        head.copy_from_slice(data);
        *self = tail;
        Ok(())
    }

    fn fill(&mut self, value: u8, len: usize) -> Result<(), AccessError> {
        let have = <[u8]>::len(self);
        if len > have {
            return Err(exhausted(len, have));
        }
        let (head, tail) = std::mem::take(self).split_at_mut(len);
        head.fill(value);
        *self = tail;
        Ok(())
    }

    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PAGE_SIZE, PAGE_SIZE64};

    #[test]
    fn writer_is_all_or_nothing() {
        let mem = GuestMemory::allocate(2 * PAGE_SIZE);
        // The second page (gpn 7) is outside guest memory.
        let gpns = [1, 7];
        let range = PagedRange::new(PAGE_SIZE - 4, 8, &gpns).unwrap();
        let mut writer = range.writer(&mem);
        assert!(writer.write(&[0xff; 8]).is_err());
        assert_eq!(writer.len(), 8, "a failed write consumes nothing");
        assert_eq!(mem.read_plain::<u32>(2 * PAGE_SIZE64 - 4).unwrap(), 0);
    }

    #[test]
    fn reader_and_writer_stream() {
        let mem = GuestMemory::allocate(4 * PAGE_SIZE);
        let gpns = [2, 0, 3];
        let range = PagedRange::new(10, 2 * PAGE_SIZE, &gpns).unwrap();
        let mut writer = range.writer(&mem);
        writer.write(&[1; 100]).unwrap();
        writer.fill(2, PAGE_SIZE).unwrap();
        writer.zero(writer.len()).unwrap();
        assert!(writer.write(&[1]).is_err());

        let mut reader = range.reader(&mem);
        let first: [u8; 100] = reader.read_plain().unwrap();
        assert_eq!(first, [1; 100]);
        reader.skip(PAGE_SIZE - 1).unwrap();
        assert_eq!(reader.read_plain::<u8>().unwrap(), 2);
        assert_eq!(reader.len(), PAGE_SIZE - 100);
        assert!(reader.skip(PAGE_SIZE).is_err());
        assert_eq!(mem.read_plain::<u8>(2 * PAGE_SIZE64 + 10).unwrap(), 1);
        assert_eq!(mem.read_plain::<u8>(PAGE_SIZE64 * 4 - 1).unwrap(), 0);
    }

    #[test]
    fn slices_implement_the_traits() {
        let mut src: &[u8] = &[1, 2, 3];
        let mut two = [0; 2];
        src.read(&mut two).unwrap();
        assert_eq!(two, [1, 2]);
        assert!(src.read(&mut two).is_err());
        let mut out = [0u8; 3];
        let mut dst: &mut [u8] = &mut out;
        dst.write(&[9]).unwrap();
        MemoryWrite::fill(&mut dst, 8, 2).unwrap();
        assert!(dst.write(&[1]).is_err());
        assert_eq!(out, [9, 8, 8]);
    }
}
