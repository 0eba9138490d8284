//! Byte windows over lists of guest pages.

use crate::{AccessError, GuestMemory, PAGE_SIZE, PAGE_SIZE64, PagedRangeReader, PagedRangeWriter};

/// A byte range scattered over guest pages: `len` bytes starting `offset` bytes into the
/// first of `gpns`, continuing page by page through the list.
///
/// Only the first and last page can be partially covered; every page in between is covered
/// whole. The range keeps only the pages it touches, so [`gpns`](Self::gpns) never lists a
/// page outside the window.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PagedRange<'a> {
    /// Byte offset into `gpns[0]`; below `PAGE_SIZE` unless the range is empty.
    start: usize,
    /// `start + len`; at most `gpns.len() * PAGE_SIZE`.
    end: usize,
    gpns: &'a [u64],
}

impl std::fmt::Debug for PagedRange<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedRange")
            .field("offset", &self.start)
            .field("len", &self.len())
            .field("gpns", &self.gpns)
            .finish()
    }
}

impl Default for PagedRange<'_> {
    fn default() -> Self {
        Self::empty()
    }
}

impl<'a> PagedRange<'a> {
    /// The empty range.
    pub const fn empty() -> Self {
        Self {
            start: 0,
            end: 0,
            gpns: &[],
        }
    }

    /// The range of `len` bytes starting `offset` bytes into the pages `gpns`. Returns `None`
    /// if the range does not fit in the pages. `offset` may exceed a page: leading pages are
    /// skipped.
    pub fn new(offset: usize, len: usize, gpns: &'a [u64]) -> Option<Self> {
        let total = gpns.len().checked_mul(PAGE_SIZE)?;
        let end = offset.checked_add(len)?;
        (end <= total).then(|| Self::normalized(offset, end, gpns))
    }

    /// Builds the range `start..end` of `gpns` (already validated) keeping only touched pages.
    fn normalized(start: usize, end: usize, gpns: &'a [u64]) -> Self {
        if start == end {
            return Self::empty();
        }
        let first = start / PAGE_SIZE;
        let last = (end - 1) / PAGE_SIZE + 1;
        let base = first * PAGE_SIZE;
        Self {
            start: start - base,
            end: end - base,
            gpns: &gpns[first..last],
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Byte offset of the range into its first page.
    pub fn offset(&self) -> usize {
        self.start
    }

    /// The guest page numbers the range touches, in order.
    pub fn gpns(&self) -> &'a [u64] {
        self.gpns
    }

    /// The sub-range of `len` bytes at `offset`, or `None` if it does not fit.
    pub fn try_subrange(&self, offset: usize, len: usize) -> Option<Self> {
        let end = offset.checked_add(len)?;
        (end <= self.len())
            .then(|| Self::normalized(self.start + offset, self.start + end, self.gpns))
    }

    /// The sub-range of `len` bytes at `offset`.
    ///
    /// # Panics
    ///
    /// If `offset + len > self.len()`, like slice indexing. Use
    /// [`try_subrange`](Self::try_subrange) for lengths that come from a guest.
    #[track_caller]
    pub fn subrange(&self, offset: usize, len: usize) -> Self {
        self.try_subrange(offset, len).unwrap_or_else(|| {
            panic!(
                "subrange {offset}+{len} out of bounds of a {}-byte range",
                self.len()
            )
        })
    }

    /// Runs of guest-physically contiguous bytes, as `(gpa, len)`, in order. Consecutive page
    /// numbers are merged into one run. A page number too large to be an address yields
    /// [`AccessError::InvalidPageNumber`].
    pub fn runs(&self) -> PagedRangeRuns<'a> {
        PagedRangeRuns { range: *self }
    }

    /// A reader over this range of `mem`.
    pub fn reader(self, mem: &'a GuestMemory) -> PagedRangeReader<'a> {
        PagedRangeReader::new(mem, self)
    }

    /// A writer over this range of `mem`.
    pub fn writer(self, mem: &'a GuestMemory) -> PagedRangeWriter<'a> {
        PagedRangeWriter::new(mem, self)
    }
}

/// Iterator over the guest-physically contiguous runs of a [`PagedRange`]; see
/// [`PagedRange::runs`].
#[derive(Debug, Clone)]
pub struct PagedRangeRuns<'a> {
    range: PagedRange<'a>,
}

impl Iterator for PagedRangeRuns<'_> {
    type Item = Result<(u64, usize), AccessError>;

    fn next(&mut self) -> Option<Self::Item> {
        let range = self.range;
        let (&first, _) = range.gpns.split_first()?;
        let Some(base) = first.checked_mul(PAGE_SIZE64) else {
            self.range = PagedRange::empty();
            return Some(Err(AccessError::InvalidPageNumber { gpn: first }));
        };
        // Extend the run while the next page is guest-physically adjacent.
        let mut pages = 1;
        while pages < range.gpns.len() && first.checked_add(pages as u64) == Some(range.gpns[pages])
        {
            pages += 1;
        }
        let run_end = range.end.min(pages * PAGE_SIZE);
        let len = run_end - range.start;
        self.range = PagedRange::normalized(run_end, range.end, range.gpns);
        // `base + start` cannot overflow unless the last page of the run is past the address
        // space, which checked_mul on the first page and adjacency do not rule out at the top.
        match base
            .checked_add(range.start as u64)
            .filter(|gpa| gpa.checked_add(len as u64).is_some())
        {
            Some(gpa) => Some(Ok((gpa, len))),
            None => {
                self.range = PagedRange::empty();
                Some(Err(AccessError::InvalidPageNumber { gpn: first }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_validates() {
        let gpns = [1, 2, 3];
        assert!(PagedRange::new(0, 3 * PAGE_SIZE, &gpns).is_some());
        assert!(PagedRange::new(1, 3 * PAGE_SIZE, &gpns).is_none());
        assert!(PagedRange::new(usize::MAX, 1, &gpns).is_none());
        assert!(PagedRange::new(0, usize::MAX, &gpns).is_none());
        let r = PagedRange::new(PAGE_SIZE + 5, 10, &gpns).unwrap();
        assert_eq!(r.gpns(), &[2]);
        assert_eq!(r.offset(), 5);
        assert_eq!(r.len(), 10);
        assert!(PagedRange::new(3 * PAGE_SIZE, 0, &gpns).unwrap().is_empty());
    }

    #[test]
    fn subrange_trims_pages() {
        let gpns = [10, 11, 20, 21];
        let r = PagedRange::new(100, 4 * PAGE_SIZE - 200, &gpns).unwrap();
        let s = r.subrange(PAGE_SIZE, PAGE_SIZE);
        assert_eq!(s.gpns(), &[11, 20]);
        assert_eq!(s.offset(), 100);
        assert!(r.try_subrange(1, r.len()).is_none());
        assert!(r.try_subrange(usize::MAX, 2).is_none());
        assert!(r.try_subrange(r.len(), 0).unwrap().is_empty());
    }

    #[test]
    fn runs_merge_contiguous_pages() {
        let gpns = [10, 11, 20, 21, 5];
        let r = PagedRange::new(100, 5 * PAGE_SIZE - 200, &gpns).unwrap();
        let runs: Vec<_> = r.runs().map(Result::unwrap).collect();
        assert_eq!(
            runs,
            vec![
                (10 * PAGE_SIZE64 + 100, 2 * PAGE_SIZE - 100),
                (20 * PAGE_SIZE64, 2 * PAGE_SIZE),
                (5 * PAGE_SIZE64, PAGE_SIZE - 100),
            ]
        );
    }

    #[test]
    fn huge_page_numbers_are_errors() {
        let gpns = [(u64::MAX >> 12) - 1, u64::MAX];
        let r = PagedRange::new(0, 2 * PAGE_SIZE, &gpns).unwrap();
        let runs: Vec<_> = r.runs().collect();
        assert!(runs[0].is_ok());
        // The very last page cannot be addressed: its end is not representable.
        let gpns = [u64::MAX >> 12];
        let r = PagedRange::new(0, PAGE_SIZE, &gpns).unwrap();
        assert!(r.runs().next().unwrap().is_err());
        assert_eq!(
            runs[1],
            Err(AccessError::InvalidPageNumber { gpn: u64::MAX })
        );
        // Adjacent pages running off the top of the address space.
        let gpns = [u64::MAX >> 12, (u64::MAX >> 12) + 1];
        let r = PagedRange::new(0, 2 * PAGE_SIZE, &gpns).unwrap();
        assert!(r.runs().any(|run| run.is_err()));
    }
}
