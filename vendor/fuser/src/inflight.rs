//! Which requests a session has read from the kernel and not answered yet.
//!
//! A FUSE connection lives as long as some process holds its `/dev/fuse` descriptor, so it can
//! outlive the server that read requests from it. The requests a dead server had read and not
//! answered stay on the kernel's *processing* list of that device, and their callers wait,
//! until something answers them. A successor on the same descriptor can: the kernel matches a
//! reply to a request by unique ID only, and answers a reply whose ID it does not hold (already
//! answered, or still waiting to be read) with `ENOENT`, changing nothing. On Linux 6.9 and
//! later the successor asks for them again ([`Notifier::resend`](crate::Notifier::resend));
//! before that, it must name them. A session given an [`InFlightRecorder`]
//! ([`Session::record_in_flight`](crate::Session::record_in_flight)) reports, each time they
//! change, bounds on the IDs of the requests it has read and not answered, for the recorder to
//! keep where a successor finds them (e.g. a shared file mapping, which outlives the process);
//! the successor answers every ID in those bounds with
//! [`Session::fail_unanswered`](crate::Session::fail_unanswered) before it reads a request.
//!
//! Why bounds are enough: the kernel numbers requests in steps of 2 as it queues them, under
//! the lock of the pending list, and readers take them off that list in order, so requests
//! that expect a reply are read in increasing order of ID (forgets, which expect none, take an
//! ID when read; interrupts have odd IDs). Hence:
//! - [`InFlightBounds::newest`] is the highest ID of a request read that expects a reply;
//! - [`InFlightBounds::oldest`] is no higher than the ID of any request read and not
//!   answered, including one a reader thread has just read and not yet reported: before each
//!   read a reader notes the `newest` it knows, and what it reads is newer than that.
//!
//! The one request per reader thread read and not yet reported may be newer than `newest`:
//! a successor covers it by answering a margin of IDs past `newest` (IDs not yet read are
//! refused by the kernel). The cost on the request path is one lock and a set insert per
//! request read and one lock and a set removal per reply, no system call.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::ll::RequestId;

/// Bounds on the unique IDs of the requests a session has read and not answered: every such
/// request has `oldest <= unique`, and every one it has reported has `unique <= newest`
/// (see the [module docs](self) for the one per reader thread that may not be reported yet).
/// Empty (`oldest > newest`) when nothing is in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlightBounds {
    /// No higher than the ID of any request read and not answered.
    pub oldest: RequestId,
    /// The highest ID of a request read that expects a reply.
    pub newest: RequestId,
}

/// Keeps the [`InFlightBounds`] a session reports, for a server that takes over the
/// connection after this one dies.
pub trait InFlightRecorder: Send + Sync {
    /// Called with the new bounds after each request read and each reply sent, in order,
    /// under a lock the reader threads share: keep it short (a few stores) and never block.
    /// Store `newest` before `oldest`: a recorder killed between the two then leaves bounds
    /// that are too wide, never too narrow (`oldest` never decreases, `newest` never does).
    fn record(&self, bounds: InFlightBounds);
}

/// The requests a session has read and not answered, shared by its reader threads and every
/// reply sender.
pub(crate) struct InFlight {
    state: Mutex<State>,
    recorder: Arc<dyn InFlightRecorder>,
}

impl fmt::Debug for InFlight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlight")
            .field("bounds", &self.state.lock().bounds())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct State {
    /// IDs read (without [`RequestId::RESEND`]) that expect a reply and have none yet.
    unanswered: BTreeSet<u64>,
    newest: u64,
    /// Per reader thread, while it reads: the `newest` it knew before the read.
    reading: Vec<Option<u64>>,
}

impl State {
    fn bounds(&self) -> InFlightBounds {
        let reading = self.reading.iter().flatten().map(|&n| n + 2).min();
        let oldest = [self.unanswered.first().copied(), reading]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(self.newest + 2)
            .min(self.newest + 2);
        InFlightBounds {
            oldest: RequestId(oldest),
            newest: RequestId(self.newest),
        }
    }
}

impl InFlight {
    /// `newest`: the highest ID an earlier server of the connection read, if known (0 if
    /// not); what this session reads is newer.
    pub(crate) fn new(recorder: Arc<dyn InFlightRecorder>, newest: RequestId) -> Self {
        Self {
            state: Mutex::new(State {
                unanswered: BTreeSet::new(),
                newest: newest.0 & !RequestId::RESEND,
                reading: Vec::new(),
            }),
            recorder,
        }
    }

    /// Reader thread `reader` is about to read a request. Reports nothing: what it notes is
    /// never below the bounds last reported.
    pub(crate) fn reading(&self, reader: usize) {
        let mut state = self.state.lock();
        if state.reading.len() <= reader {
            state.reading.resize(reader + 1, None);
        }
        state.reading[reader] = Some(state.newest);
    }

    /// Reader thread `reader` read a request: `unique` if it expects a reply, `None` if not
    /// (or if the read failed).
    pub(crate) fn read(&self, reader: usize, unique: Option<RequestId>) {
        let mut state = self.state.lock();
        if let Some(r) = state.reading.get_mut(reader) {
            *r = None;
        }
        let Some(unique) = unique else { return };
        let unique = unique.0 & !RequestId::RESEND;
        state.unanswered.insert(unique);
        state.newest = state.newest.max(unique);
        self.recorder.record(state.bounds());
    }

    /// The reply to `unique` was written (or failed to be: either way the request is done).
    pub(crate) fn answered(&self, unique: RequestId) {
        let mut state = self.state.lock();
        if state.unanswered.remove(&(unique.0 & !RequestId::RESEND)) {
            self.recorder.record(state.bounds());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Last(Mutex<Vec<InFlightBounds>>);

    impl InFlightRecorder for Last {
        fn record(&self, bounds: InFlightBounds) {
            self.0.lock().push(bounds);
        }
    }

    fn bounds(oldest: u64, newest: u64) -> InFlightBounds {
        InFlightBounds {
            oldest: RequestId(oldest),
            newest: RequestId(newest),
        }
    }

    #[test]
    fn bounds_follow_the_oldest_unanswered_and_the_newest_read() {
        let rec = Arc::new(Last::default());
        let f = InFlight::new(rec.clone(), RequestId(0));
        f.reading(0);
        f.read(0, Some(RequestId(2)));
        f.reading(0);
        f.read(0, Some(RequestId(4)));
        f.reading(0);
        f.read(0, None); // a forget
        f.answered(RequestId(4));
        f.answered(RequestId(4)); // twice: nothing new
        f.answered(RequestId(2));
        assert_eq!(
            *rec.0.lock(),
            vec![bounds(2, 2), bounds(2, 4), bounds(2, 4), bounds(6, 4)]
        );
    }

    #[test]
    fn a_reader_between_read_and_report_holds_the_oldest_bound_down() {
        let rec = Arc::new(Last::default());
        let f = InFlight::new(rec.clone(), RequestId(10));
        // Reader 0 is about to read (it will get 12, say, and be slow to report it).
        f.reading(0);
        // Reader 1 reads 14 and answers it meanwhile.
        f.reading(1);
        f.read(1, Some(RequestId(14)));
        f.answered(RequestId(14));
        // 12 is still covered: the oldest bound stays at what reader 0 may have read.
        assert_eq!(rec.0.lock().last(), Some(&bounds(12, 14)));
        f.read(0, Some(RequestId(12)));
        assert_eq!(rec.0.lock().last(), Some(&bounds(12, 14)));
        f.answered(RequestId(12));
        // Reader 1 is reading again, having known 14.
        assert_eq!(rec.0.lock().last(), Some(&bounds(16, 14)));
    }

    #[test]
    fn resent_ids_are_tracked_without_the_resend_bit() {
        let rec = Arc::new(Last::default());
        let f = InFlight::new(rec.clone(), RequestId(8));
        f.reading(0);
        f.read(0, Some(RequestId(6 | RequestId::RESEND)));
        assert_eq!(rec.0.lock().last(), Some(&bounds(6, 8)));
        f.answered(RequestId(6 | RequestId::RESEND));
        assert_eq!(rec.0.lock().last(), Some(&bounds(10, 8)));
    }

    #[test]
    fn bounds_never_narrow_below_what_is_in_flight_under_threads() {
        let rec = Arc::new(Last::default());
        let f = Arc::new(InFlight::new(rec.clone(), RequestId(0)));
        let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|reader| {
                let f = f.clone();
                let next = next.clone();
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        f.reading(reader);
                        let u = next.fetch_add(2, std::sync::atomic::Ordering::SeqCst) + 2;
                        f.read(reader, Some(RequestId(u)));
                        f.answered(RequestId(u));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let recorded = rec.0.lock();
        for w in recorded.windows(2) {
            assert!(w[0].oldest <= w[1].oldest, "{w:?}");
            assert!(w[0].newest <= w[1].newest, "{w:?}");
        }
        assert_eq!(recorded.last(), Some(&bounds(16002, 16000)));
    }
}
