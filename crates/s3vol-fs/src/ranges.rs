//! A set of byte ranges, kept sorted and merged.

use std::ops::Range;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: Vec<Range<u64>>,
}

impl RangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, r: Range<u64>) {
        if r.is_empty() {
            return;
        }
        let mut start = r.start;
        let mut end = r.end;
        let mut out = Vec::with_capacity(self.ranges.len() + 1);
        let mut placed = false;
        for x in self.ranges.drain(..) {
            if x.end < start {
                out.push(x);
            } else if x.start > end {
                if !placed {
                    out.push(start..end);
                    placed = true;
                }
                out.push(x);
            } else {
                start = start.min(x.start);
                end = end.max(x.end);
            }
        }
        if !placed {
            out.push(start..end);
        }
        self.ranges = out;
    }

    /// The parts of `r` not in the set.
    pub fn missing(&self, r: Range<u64>) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        let mut pos = r.start;
        for x in &self.ranges {
            if x.end <= pos {
                continue;
            }
            if x.start >= r.end {
                break;
            }
            if x.start > pos {
                out.push(pos..x.start.min(r.end));
            }
            pos = pos.max(x.end);
            if pos >= r.end {
                break;
            }
        }
        if pos < r.end {
            out.push(pos..r.end);
        }
        out
    }

    pub fn intersects(&self, r: &Range<u64>) -> bool {
        !r.is_empty()
            && self
                .ranges
                .iter()
                .any(|x| x.start < r.end && r.start < x.end)
    }

    /// Drops everything at or past `len`.
    pub fn truncate(&mut self, len: u64) {
        self.ranges.retain(|x| x.start < len);
        if let Some(last) = self.ranges.last_mut() {
            last.end = last.end.min(len);
        }
    }

    pub fn clear(&mut self) {
        self.ranges.clear();
    }

    /// The ranges, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Range<u64>> {
        self.ranges.iter()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn insert_merges_and_missing_finds_gaps() {
        let mut s = RangeSet::new();
        s.insert(10..20);
        s.insert(30..40);
        s.insert(20..25);
        assert_eq!(s.missing(0..50), vec![0..10, 25..30, 40..50]);
        assert_eq!(s.missing(12..18), Vec::<Range<u64>>::new());
        s.insert(5..35);
        assert_eq!(s.missing(0..50), vec![0..5, 40..50]);
        assert!(s.intersects(&(39..41)));
        assert!(!s.intersects(&(40..41)));
        s.truncate(8);
        assert_eq!(s.missing(0..10), vec![0..5, 8..10]);
    }

    proptest! {
        #[test]
        fn matches_a_bitmap(ops in proptest::collection::vec((0u64..64, 0u64..64), 0..20), q in (0u64..64, 0u64..64), cut in 0u64..70) {
            let mut set = RangeSet::new();
            let mut bits = [false; 64];
            for (a, b) in ops {
                let (a, b) = (a.min(b), a.max(b));
                set.insert(a..b);
                for bit in &mut bits[a as usize..b as usize] { *bit = true; }
            }
            set.truncate(cut);
            for (i, bit) in bits.iter_mut().enumerate() { if i as u64 >= cut { *bit = false; } }
            let (a, b) = (q.0.min(q.1), q.0.max(q.1));
            let missing: Vec<u64> = set.missing(a..b).into_iter().flatten().collect();
            let expected: Vec<u64> = (a..b).filter(|&i| !bits[i as usize]).collect();
            prop_assert_eq!(missing, expected);
            prop_assert_eq!(set.intersects(&(a..b)), (a..b).any(|i| bits[i as usize]));
        }
    }
}
