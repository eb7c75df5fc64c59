//! Which micro-batch sizes the engine replays as CUDA graphs ([`super::EngineOptions::cuda_graphs`]).
//!
//! A training pass launches ~3,000 kernels for gpt-oss-20b; replayed from a graph they start
//! without the host launching each one. A graph holds every launch's arguments (buffer addresses,
//! sizes), so it serves only passes of the size it was captured for, and only while the buffers
//! it names stay where they were. The cache keeps the sizes seen most recently: a size is run
//! eagerly the first time it comes (which also compiles and loads any kernel not yet loaded and
//! grows any scratch it needs), captured the second time, and replayed from then on. A benchmark
//! or data of one micro-batch size captures once. `train`'s padding-free micro-batches vary in
//! size and seldom come again while cached; a capture that is never replayed costs little (on an
//! H200 the capturing pass of a gpt-oss-20b step took 0.182 s against 0.178 s eager and 0.172 s
//! replayed: PERFORMANCE.md v20).

/// What [`GraphCache::take`] found for a size.
#[derive(Debug, PartialEq)]
pub(super) enum Lookup<G> {
    /// First time seen (now recorded): run the pass eagerly.
    New,
    /// Seen before without graphs: capture them.
    Seen,
    /// Its graphs, taken out of the cache: [`GraphCache::put`] them back after the launch.
    Ready(G),
}

/// The micro-batch sizes seen, most recently used last, each with its graphs once captured.
#[derive(Debug)]
pub(super) struct GraphCache<G> {
    sizes: Vec<(usize, Option<G>)>,
    cap: usize,
}

impl<G> GraphCache<G> {
    /// A cache of at most `cap` sizes (at least one).
    pub(super) fn new(cap: usize) -> Self {
        Self { sizes: Vec::new(), cap: cap.max(1) }
    }

    /// Looks `t` up and marks it as the most recently used size.
    pub(super) fn take(&mut self, t: usize) -> Lookup<G> {
        match self.sizes.iter().position(|(s, _)| *s == t) {
            Some(i) => {
                let (_, g) = self.sizes.remove(i);
                self.sizes.push((t, None));
                g.map_or(Lookup::Seen, Lookup::Ready)
            }
            None => {
                self.push(t, None);
                Lookup::New
            }
        }
    }

    /// Stores `t`'s graphs as the most recently used size.
    pub(super) fn put(&mut self, t: usize, g: G) {
        self.sizes.retain(|(s, _)| *s != t);
        self.push(t, Some(g));
    }

    /// Forgets every size and drops every graph.
    pub(super) fn clear(&mut self) {
        self.sizes.clear();
    }

    /// Sizes that hold graphs.
    pub(super) fn graphed(&self) -> usize {
        self.sizes.iter().filter(|(_, g)| g.is_some()).count()
    }

    fn push(&mut self, t: usize, g: Option<G>) {
        if self.sizes.len() == self.cap {
            self.sizes.remove(0);
        }
        self.sizes.push((t, g));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_size_runs_eagerly_then_is_captured_then_replays() {
        let mut c = GraphCache::new(2);
        assert_eq!(c.take(2048), Lookup::New);
        assert_eq!(c.take(2048), Lookup::Seen);
        c.put(2048, "graphs of 2048");
        assert_eq!(c.take(2048), Lookup::Ready("graphs of 2048"));
        // Taken out until put back: a failed launch leaves the size to be captured again.
        assert_eq!(c.take(2048), Lookup::Seen);
        c.put(2048, "again");
        assert_eq!(c.graphed(), 1);
        assert_eq!(c.take(2048), Lookup::Ready("again"));
    }

    #[test]
    fn the_least_recently_used_size_goes_first() {
        let mut c = GraphCache::new(2);
        c.take(10);
        c.put(10, 'a');
        c.take(20);
        c.put(20, 'b');
        // 10 used again: 20 is now the oldest, and a third size evicts it.
        assert_eq!(c.take(10), Lookup::Ready('a'));
        c.put(10, 'a');
        assert_eq!(c.take(30), Lookup::New);
        assert_eq!(c.graphed(), 1);
        assert_eq!(c.take(20), Lookup::New, "20 was evicted with its graphs");
        assert_eq!(c.take(10), Lookup::New, "and 10 when 20 came back");
        c.clear();
        assert_eq!(c.graphed(), 0);
        assert_eq!(c.take(30), Lookup::New);
    }
}
