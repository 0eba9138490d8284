//! Which sectors of a read a layer supplied.

use smallvec::SmallVec;
use std::ops::Range;

/// Words of the bitmap stored inline: 128 sectors, so requests up to 64 KiB of 512-byte
/// sectors (or 512 KiB of 4 KiB sectors) track presence without a heap allocation. Kept
/// small because the bitmap lives in the read future, which `Disk` stores inline.
const INLINE_WORDS: usize = 2;

/// One bit per sector of a read request: set once some layer has supplied the sector.
#[derive(Debug, Clone)]
pub(crate) struct SectorBitmap {
    words: SmallVec<[u64; INLINE_WORDS]>,
    len: u64,
}

impl SectorBitmap {
    pub(crate) fn new(len: u64) -> Self {
        Self {
            words: smallvec::smallvec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    pub(crate) fn is_set(&self, index: u64) -> bool {
        self.words[(index / 64) as usize] & (1 << (index % 64)) != 0
    }

    fn set_range(&mut self, range: Range<u64>) {
        let mut i = range.start;
        while i < range.end {
            let word = (i / 64) as usize;
            let bit = i % 64;
            let n = (64 - bit).min(range.end - i);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            self.words[word] |= mask;
            i += n;
        }
    }

    pub(crate) fn is_full(&self) -> bool {
        self.next_clear(0) == self.len
    }

    /// The first clear bit at or after `from`, or `len`.
    fn next_clear(&self, from: u64) -> u64 {
        self.next_with(from, true)
    }

    /// The first set bit at or after `from`, or `len`.
    fn next_set(&self, from: u64) -> u64 {
        self.next_with(from, false)
    }

    fn next_with(&self, from: u64, clear: bool) -> u64 {
        let mut index = from;
        while index < self.len {
            let word = (index / 64) as usize;
            let mut bits = self.words[word];
            if clear {
                bits = !bits;
            }
            bits &= u64::MAX << (index % 64);
            if bits != 0 {
                return (word as u64 * 64 + bits.trailing_zeros() as u64).min(self.len);
            }
            index = (word as u64 + 1) * 64;
        }
        self.len
    }

    /// Maximal runs of clear bits within `range`, as index ranges.
    pub(crate) fn clear_runs(&self, range: Range<u64>) -> impl Iterator<Item = Range<u64>> + '_ {
        let mut at = range.start;
        std::iter::from_fn(move || {
            let start = self.next_clear(at).min(range.end);
            if start >= range.end {
                return None;
            }
            let end = self.next_set(start).min(range.end);
            at = end;
            Some(start..end)
        })
    }

    /// Maximal runs of bits set in `self` but clear in `before`.
    pub(crate) fn newly_set_runs<'a>(
        &'a self,
        before: &'a Self,
    ) -> impl Iterator<Item = Range<u64>> + 'a {
        let mut at = 0;
        let newly = move |i: u64| self.is_set(i) && !before.is_set(i);
        std::iter::from_fn(move || {
            while at < self.len && !newly(at) {
                at += 1;
            }
            if at >= self.len {
                return None;
            }
            let start = at;
            while at < self.len && newly(at) {
                at += 1;
            }
            Some(start..at)
        })
    }
}

/// Records which sectors a layer's read supplied; handed to
/// [`LayerIo::read`](crate::LayerIo::read).
///
/// Sectors are absolute sector numbers. Marks outside the range the layer was asked for are
/// ignored, so a layer cannot claim sectors it was not asked to read.
#[derive(Debug)]
pub struct SectorMarker<'a> {
    bitmap: &'a mut SectorBitmap,
    /// The sector that bit 0 of the bitmap stands for.
    bitmap_base: u64,
    /// The sectors this layer was asked for.
    range: Range<u64>,
}

impl<'a> SectorMarker<'a> {
    pub(crate) fn new(bitmap: &'a mut SectorBitmap, bitmap_base: u64, range: Range<u64>) -> Self {
        Self {
            bitmap,
            bitmap_base,
            range,
        }
    }

    /// Marks `sector` as supplied.
    pub fn set(&mut self, sector: u64) {
        self.set_range(sector..sector.saturating_add(1));
    }

    /// Marks the sectors in `range` as supplied.
    pub fn set_range(&mut self, range: Range<u64>) {
        let start = range.start.max(self.range.start);
        let end = range.end.min(self.range.end);
        if start < end {
            self.bitmap
                .set_range(start - self.bitmap_base..end - self.bitmap_base);
        }
    }

    /// Marks every sector the layer was asked for as supplied.
    pub fn set_all(&mut self) {
        self.set_range(self.range.clone());
    }

    /// The sectors the layer was asked for.
    pub fn range(&self) -> Range<u64> {
        self.range.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_marks() {
        let mut bitmap = SectorBitmap::new(200);
        {
            let mut marker = SectorMarker::new(&mut bitmap, 1000, 1010..1100);
            marker.set(1000); // outside the asked range: ignored
            marker.set(1010);
            marker.set_range(1050..1070);
            marker.set_range(1090..5000);
            marker.set(u64::MAX);
        }
        let runs: Vec<_> = bitmap.clear_runs(0..200).collect();
        assert_eq!(runs, vec![0..10, 11..50, 70..90, 100..200]);
        let runs: Vec<_> = bitmap.clear_runs(60..95).collect();
        assert_eq!(runs, vec![70..90]);
        let before = bitmap.clone();
        SectorMarker::new(&mut bitmap, 1000, 1000..1200).set_all();
        assert!(bitmap.is_full());
        let new: Vec<_> = bitmap.newly_set_runs(&before).collect();
        assert_eq!(new, vec![0..10, 11..50, 70..90, 100..200]);
        assert!(SectorBitmap::new(0).is_full());
    }

    #[test]
    fn word_boundaries() {
        for len in [1, 63, 64, 65, 128, 300] {
            let mut bitmap = SectorBitmap::new(len);
            SectorMarker::new(&mut bitmap, 0, 0..len).set_range(len - 1..len);
            let runs: Vec<(u64, u64)> = bitmap
                .clear_runs(0..len)
                .map(|r| (r.start, r.end))
                .collect();
            let expected: Vec<(u64, u64)> = if len > 1 {
                vec![(0, len - 1)]
            } else {
                Vec::new()
            };
            assert_eq!(runs, expected);
            SectorMarker::new(&mut bitmap, 0, 0..len).set_all();
            assert!(bitmap.is_full());
        }
    }
}
