//! Where each sector of the striped disk lives: the chunk arithmetic, kept apart from I/O so
//! that it can be tested exhaustively.

/// The stripe geometry: `members` disks, chunks of `chunk_sectors` sectors. Chunk `i` of
/// the striped disk is chunk `i / members` of member `i % members`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    members: u64,
    chunk_sectors: u64,
}

/// A run of a request's sectors that lies on one member: `sectors` sectors starting at
/// `member_sector` of member `member`, taken from the request's sectors starting at
/// `request_sector` (counted from the start of the request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub member: usize,
    pub member_sector: u64,
    pub request_sector: u64,
    pub sectors: u64,
}

impl Layout {
    /// The layout of `members` disks with chunks of `chunk_sectors` sectors; both must be
    /// non-zero (the constructor of `StripedDisk` checks).
    pub fn new(members: usize, chunk_sectors: u64) -> Self {
        debug_assert!(members > 0 && chunk_sectors > 0);
        Self {
            members: members as u64,
            chunk_sectors,
        }
    }

    /// The sectors of one stripe (one chunk on every member).
    pub fn stripe_sectors(&self) -> Option<u64> {
        self.chunk_sectors.checked_mul(self.members)
    }

    /// The member and the sector on it that hold `sector`.
    pub fn locate(&self, sector: u64) -> (usize, u64) {
        let chunk = sector / self.chunk_sectors;
        let offset = sector % self.chunk_sectors;
        (
            (chunk % self.members) as usize,
            (chunk / self.members) * self.chunk_sectors + offset,
        )
    }

    /// The pieces of a request of `sectors` sectors at `sector`, in request order: one per
    /// chunk it touches, except that a single member (where consecutive chunks are
    /// contiguous on the member and in the buffer) gets one piece for the whole request.
    ///
    /// `sector + sectors` must not overflow (callers check the range first).
    pub fn pieces(&self, sector: u64, sectors: u64) -> Pieces {
        Pieces {
            layout: *self,
            start: sector,
            next: sector,
            end: sector + sectors,
        }
    }

    /// The range of each member that an unmap of `count` sectors at `sector` covers, as
    /// `(member, member_sector, member_count)`: the chunks a member holds in the range are
    /// consecutive on it (only the first and last can be partial), so one range per member
    /// covers exactly its share. Members with no share are left out. `count` must be
    /// non-zero and `sector + count` must not overflow.
    pub fn member_ranges(
        &self,
        sector: u64,
        count: u64,
    ) -> impl Iterator<Item = (usize, u64, u64)> {
        let (n, cs) = (self.members, self.chunk_sectors);
        let end = sector + count;
        let first_chunk = sector / cs;
        let last_chunk = (end - 1) / cs;
        (0..n).filter_map(move |member| {
            // The first and last chunk of the range that live on `member`.
            let first = first_chunk + (member + n - first_chunk % n) % n;
            if first > last_chunk {
                return None;
            }
            let last = last_chunk - (last_chunk % n + n - member) % n;
            let start = (first / n) * cs + if first == first_chunk { sector % cs } else { 0 };
            let stop = (last / n) * cs
                + if last == last_chunk {
                    (end - 1) % cs + 1
                } else {
                    cs
                };
            Some((member as usize, start, stop - start))
        })
    }
}

/// The iterator of [`Layout::pieces`].
#[derive(Debug, Clone)]
pub(crate) struct Pieces {
    layout: Layout,
    start: u64,
    next: u64,
    end: u64,
}

impl Iterator for Pieces {
    type Item = Piece;

    fn next(&mut self) -> Option<Piece> {
        if self.next >= self.end {
            return None;
        }
        let (member, member_sector) = self.layout.locate(self.next);
        let remaining = self.end - self.next;
        let sectors = if self.layout.members == 1 {
            remaining
        } else {
            (self.layout.chunk_sectors - self.next % self.layout.chunk_sectors).min(remaining)
        };
        let piece = Piece {
            member,
            member_sector,
            request_sector: self.next - self.start,
            sectors,
        };
        self.next += sectors;
        Some(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn locate_follows_the_chunk_rule() {
        let layout = Layout::new(3, 4);
        // Chunk 0 on member 0, chunk 1 on member 1, chunk 2 on member 2, chunk 3 on member
        // 0 at its second chunk.
        assert_eq!(layout.locate(0), (0, 0));
        assert_eq!(layout.locate(5), (1, 1));
        assert_eq!(layout.locate(11), (2, 3));
        assert_eq!(layout.locate(12), (0, 4));
        assert_eq!(layout.locate(u64::MAX), (0, (u64::MAX / 4 / 3) * 4 + 3));
        assert_eq!(Layout::new(1, 7).locate(1000), (0, 1000));
    }

    /// Every sector of every request lands where `locate` says, pieces tile the request in
    /// order, and the unmap ranges are exactly each member's share.
    #[test]
    fn pieces_and_member_ranges_match_locate() {
        let mut rng = StdRng::seed_from_u64(4);
        for _ in 0..3000 {
            let members = rng.random_range(1..=6);
            let chunk_sectors = rng.random_range(1..=9);
            let layout = Layout::new(members, chunk_sectors);
            let sector = rng.random_range(0..200);
            let count = rng.random_range(1..=80);

            let mut next = 0;
            let mut share: Vec<Vec<u64>> = vec![Vec::new(); members];
            for piece in layout.pieces(sector, count) {
                assert_eq!(piece.request_sector, next, "pieces are in request order");
                assert!(piece.sectors > 0);
                if members > 1 {
                    assert!(piece.sectors <= chunk_sectors, "one chunk per piece");
                }
                for i in 0..piece.sectors {
                    let s = sector + piece.request_sector + i;
                    assert_eq!(layout.locate(s), (piece.member, piece.member_sector + i));
                    share[piece.member].push(piece.member_sector + i);
                }
                next += piece.sectors;
            }
            assert_eq!(next, count, "pieces cover the request");

            let mut seen = vec![false; members];
            for (member, start, len) in layout.member_ranges(sector, count) {
                assert!(!seen[member], "one range per member");
                seen[member] = true;
                let expected: Vec<u64> = (start..start + len).collect();
                let mut got = share[member].clone();
                got.sort_unstable();
                assert_eq!(got, expected, "member {member} share");
            }
            for (member, s) in share.iter().enumerate() {
                assert_eq!(seen[member], !s.is_empty());
            }
        }
    }

    #[test]
    fn extremes_do_not_overflow() {
        let layout = Layout::new(4, 1 << 20);
        let last = u64::MAX - 1;
        assert_eq!(layout.pieces(last, 1).count(), 1);
        assert_eq!(layout.member_ranges(last, 1).count(), 1);
        assert_eq!(layout.member_ranges(0, u64::MAX).count(), 4);
        assert_eq!(Layout::new(usize::MAX, 2).stripe_sectors(), None);
    }
}
