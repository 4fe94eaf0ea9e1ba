//! Deadlines on the data plane: one tokio timer per worker thread instead of one per deadline.
//!
//! Every forwarded request arms several deadlines (hyper's header read timeout for the next
//! request, the upstream response timeout, the two body deadlines) and nearly all of them are
//! cancelled long before they fire. As tokio timers each one is a boxed entry in the shared
//! timer wheel, taken and put back under its lock, and re-arming the header read timeout after
//! each response wakes the worker's own driver through its eventfd (the new deadline is
//! earlier than the one the driver last slept towards): one `write` and one extra
//! `epoll_wait` per request on an unloaded connection (docs/performance.md).
//!
//! Here a worker keeps its deadlines in a thread-local timing wheel (`timerwheel`), and one
//! task (`drive`) sleeps on a single tokio timer towards the earliest of them. Arming a
//! deadline later than the one `drive` sleeps towards costs a few array writes and nothing
//! else; a cancelled deadline is unlinked from its slot's list (an ordered map paid a search
//! and a rebalance for each, ~500 instructions). Resolution is tokio's (1 ms): deadlines fire
//! no earlier than asked. Polling a deadline reads no clock: `drive` reads it once per
//! wake-up and takes what is due out of the wheel, and a deadline whose entry is gone has
//! fired (every poll read it before: three times a request).
//! A deadline moved later keeps its entry where it was filed and is filed again, once, when
//! `drive` takes that entry early (`Deadline::reset`): hyper's header read timeout moves
//! later after every response, and costs no wheel operation for it.
//!
//! A `Deadline` polled on a thread without a wheel (the admin and control listeners, tests on
//! the multi-thread runtime) is a plain tokio sleep, so the same types serve every listener.

use crate::timerwheel::{Key, TimerWheel, MAX_TICK};
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// One worker's deadlines: key (`Wheel::insert`) → the waker of the task waiting on it.
struct Wheel {
    /// Identifies this wheel, so a deadline never touches another thread's entries.
    id: u64,
    /// Milliseconds of the keys count from here.
    epoch: Instant,
    entries: TimerWheel,
    /// The millisecond `drive` sleeps towards (`None`: nothing, it waits to be woken).
    armed: Option<u64>,
    driver: Option<Waker>,
}

impl Wheel {
    /// The millisecond of `at` since the epoch, rounded up: a deadline is due once that
    /// millisecond has begun, never before `at`.
    fn tick(&self, at: Instant) -> u64 {
        let d = at.saturating_duration_since(self.epoch);
        // Seconds and nanoseconds apart: `as_nanos` is a u128, and its division a call.
        let ms = d.as_secs() * 1000 + u64::from(d.subsec_nanos()).div_ceil(1_000_000);
        ms.min(MAX_TICK)
    }

    /// The millisecond that has begun at `now` (rounded down).
    fn now_tick(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Whether a deadline at `at`, whose entry (filed for millisecond `tick`) `drive` has
    /// taken, is due: it is unless it moved past that millisecond since it was filed
    /// (`Deadline::reset`).
    fn taken_is_due(&self, at: Instant, tick: u64) -> bool {
        self.tick(at) <= tick
    }

    /// File `waker` for `at`: the state of a deadline waiting in this wheel.
    fn insert(&mut self, at: Instant, waker: Waker) -> State {
        let tick = self.tick(at);
        let key = self.entries.insert(tick, waker);
        // Earlier than what `drive` sleeps towards (or it sleeps on nothing): it re-arms.
        if self.armed.is_none_or(|armed| tick < armed) {
            self.armed = Some(tick);
            if let Some(d) = &self.driver {
                d.wake_by_ref();
            }
        }
        State::Wheel {
            wheel: self.id,
            key,
            tick,
        }
    }
}

thread_local! {
    static WHEEL: RefCell<Option<Wheel>> = const { RefCell::new(None) };
}

/// Wheels ever installed, for their ids.
static WHEELS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Give the current thread a wheel and return the task that fires its deadlines; spawn it on
/// the thread's current-thread runtime. Deadlines first polled on this thread use the wheel.
pub fn install() -> impl Future<Output = ()> {
    let id = WHEELS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    WHEEL.with_borrow_mut(|w| {
        *w = Some(Wheel {
            id,
            epoch: Instant::now(),
            entries: TimerWheel::default(),
            armed: None,
            driver: None,
        })
    });
    drive()
}

/// Sleeps on one tokio timer towards the wheel's earliest deadline and wakes every deadline
/// that has passed. Runs for the life of the worker.
async fn drive() {
    let mut sleep = Box::pin(tokio::time::sleep(Duration::ZERO));
    let mut sleeps_to: Option<Instant> = None;
    std::future::poll_fn(|cx| loop {
        let now = Instant::now();
        let mut due = Vec::new();
        let earliest = WHEEL.with_borrow_mut(|w| {
            let w = w.as_mut()?;
            w.entries.advance(w.now_tick(now), &mut due);
            if !w.driver.as_ref().is_some_and(|d| d.will_wake(cx.waker())) {
                w.driver = Some(cx.waker().clone());
            }
            w.armed = w.entries.next_expiration();
            w.armed.map(|tick| w.epoch + Duration::from_millis(tick))
        });
        // Woken outside the borrow: a waker may run code that arms another deadline.
        due.into_iter().for_each(Waker::wake);
        match earliest {
            None => return Poll::Pending,
            Some(at) => {
                if sleeps_to != Some(at) {
                    sleep.as_mut().reset(at.into());
                    sleeps_to = Some(at);
                }
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
        }
    })
    .await
}

/// A point in time a task waits for (`Future` that completes at or after it). Cheap to arm,
/// reset and drop on a worker thread; see the module header.
#[derive(Debug)]
pub struct Deadline {
    at: Instant,
    state: State,
}

#[derive(Debug)]
enum State {
    /// Not polled yet, or polled and not registered anywhere.
    Idle,
    /// In the wheel `wheel` under `key`, filed for millisecond `tick`.
    Wheel { wheel: u64, key: Key, tick: u64 },
    /// Taken out of its wheel by `drive`: due.
    Fired,
    /// No wheel on the polling thread: a tokio timer.
    Tokio(Pin<Box<tokio::time::Sleep>>),
}

impl Deadline {
    pub fn at(at: Instant) -> Deadline {
        Deadline {
            at,
            state: State::Idle,
        }
    }

    pub fn after(d: Duration) -> Deadline {
        Deadline::at(Instant::now() + d)
    }

    /// Move the deadline; a task already waiting on it is woken at the new time. A deadline
    /// that has fired stays fired unless it moves later (then it is armed again).
    ///
    /// Moved later while in the wheel, its entry stays where it is: when `drive` takes it,
    /// `register` finds the deadline not due yet (its millisecond is past the entry's) and
    /// files it again, once. hyper moves a connection's header read timeout later after every
    /// response, so a request costs no wheel operation for it (a remove and an insert before).
    pub fn reset(&mut self, at: Instant) {
        let later = at > self.at;
        self.at = at;
        match &mut self.state {
            State::Tokio(sleep) => sleep.as_mut().reset(at.into()),
            State::Wheel { .. } if later => {}
            State::Wheel { wheel, key, tick } => {
                // `None`: not this thread's wheel; `Some(Err(due))`: `drive` took it, and the
                // new instant is due if its millisecond is not past the entry's.
                let moved = WHEEL.with_borrow_mut(|w| {
                    let w = w.as_mut().filter(|w| w.id == *wheel)?;
                    Some(match w.entries.remove(*key) {
                        Some(waker) => Ok(w.insert(at, waker)),
                        None => Err(w.taken_is_due(at, *tick)),
                    })
                });
                match moved {
                    Some(Ok(filed)) => self.state = filed,
                    Some(Err(true)) => self.state = State::Fired,
                    _ => self.state = State::Idle,
                }
            }
            State::Fired if later => self.state = State::Idle,
            State::Fired | State::Idle => {}
        }
    }

    fn unregister(&mut self) {
        if let State::Wheel { wheel, key, .. } = std::mem::replace(&mut self.state, State::Idle) {
            // `try_with`: a deadline dropped while the thread's locals are torn down.
            let _ = WHEEL.try_with(|w| {
                if let Some(w) = w.borrow_mut().as_mut().filter(|w| w.id == wheel) {
                    w.entries.remove(key);
                }
            });
        }
    }

    /// Register (or refresh) the waker in this thread's wheel. No clock is read: a deadline
    /// already due when it is first polled is inserted like any other, and `drive` (woken by
    /// the insert, since it is earlier than anything it sleeps towards) fires it; one that
    /// left the wheel since it was registered was fired (`unregister` and `reset` change the
    /// state when they take an entry out).
    fn register(&mut self, cx: &Context<'_>) -> Registered {
        if let State::Fired = self.state {
            return Registered::Fired;
        }
        WHEEL.with_borrow_mut(|w| {
            let Some(w) = w.as_mut() else {
                return Registered::NoWheel;
            };
            if let State::Wheel { wheel, key, tick } = &self.state {
                if *wheel == w.id {
                    let Some(waker) = w.entries.get_mut(*key) else {
                        // Taken by `drive`: due, unless moved later since it was filed.
                        if w.taken_is_due(self.at, *tick) {
                            return Registered::Fired;
                        }
                        self.state = w.insert(self.at, cx.waker().clone());
                        return Registered::Waiting;
                    };
                    if !waker.will_wake(cx.waker()) {
                        *waker = cx.waker().clone();
                    }
                    return Registered::Waiting;
                }
            }
            self.state = w.insert(self.at, cx.waker().clone());
            Registered::Waiting
        })
    }
}

/// What `Deadline::register` found.
enum Registered {
    /// In this thread's wheel, not due yet.
    Waiting,
    /// Taken out of the wheel by `drive`: due.
    Fired,
    /// The thread has no wheel.
    NoWheel,
}

impl Future for Deadline {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if let State::Tokio(sleep) = &mut this.state {
            return sleep.as_mut().poll(cx);
        }
        match this.register(cx) {
            Registered::Waiting => return Poll::Pending,
            Registered::Fired => {
                this.state = State::Fired;
                return Poll::Ready(());
            }
            Registered::NoWheel => {}
        }
        let mut sleep = Box::pin(tokio::time::sleep_until(this.at.into()));
        let poll = sleep.as_mut().poll(cx);
        this.state = State::Tokio(sleep);
        poll
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        self.unregister();
    }
}

impl hyper::rt::Sleep for Deadline {}

/// hyper's timer (header read timeout, HTTP/2 keep-alive) on `Deadline`s.
#[derive(Debug, Clone, Copy, Default)]
pub struct HyperTimer;

impl hyper::rt::Timer for HyperTimer {
    fn sleep(&self, d: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Deadline::after(d))
    }

    fn sleep_until(&self, at: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Deadline::at(at))
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, at: Instant) {
        match sleep.as_mut().downcast_mut_pin::<Deadline>() {
            Some(mut d) => d.reset(at),
            None => *sleep = self.sleep_until(at),
        }
    }
}

/// `fut` given until `d` has passed: `Err(Elapsed)` if it had not finished by then.
pub fn timeout<F: Future>(d: Duration, fut: F) -> Timeout<F> {
    timeout_at(Instant::now() + d, fut)
}

/// `fut` given until `at`: `Err(Elapsed)` if it had not finished by then. (An instant, not
/// a duration: the caller has read the clock already, for its own timing.)
pub fn timeout_at<F: Future>(at: Instant, fut: F) -> Timeout<F> {
    Timeout {
        fut,
        deadline: Deadline::at(at),
    }
}

pin_project_lite::pin_project! {
    /// What `timeout` returns. A struct, not an `async fn`: the wrapped future (the upstream
    /// exchange, several KiB) is moved into it once and polled in place.
    #[derive(Debug)]
    pub struct Timeout<F> {
        #[pin]
        fut: F,
        deadline: Deadline,
    }
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.fut.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        Pin::new(this.deadline).poll(cx).map(|()| Err(Elapsed))
    }
}

/// The time given to `timeout` ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("deadline has elapsed")]
pub struct Elapsed;

#[cfg(test)]
mod tests {
    use super::*;

    fn on_worker<F: Future>(f: F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::spawn(install());
            f.await
        })
    }

    fn entries() -> usize {
        WHEEL.with_borrow(|w| w.as_ref().map_or(0, |w| w.entries.len()))
    }

    #[test]
    fn deadlines_fire_in_order_and_never_early() {
        on_worker(async {
            let start = Instant::now();
            // The later one first: the driver then has to re-arm for the earlier one.
            let late = tokio::spawn(async move {
                Deadline::after(Duration::from_millis(60)).await;
                start.elapsed()
            });
            tokio::task::yield_now().await;
            let armed = || WHEEL.with_borrow(|w| w.as_ref().and_then(|w| w.armed));
            let tick = |at| WHEEL.with_borrow(|w| w.as_ref().map(|w| w.tick(at)));
            let late_at = armed().expect("the later deadline is armed");
            let mut early = Deadline::after(Duration::from_millis(20));
            assert!(futures_poll_once(Pin::new(&mut early)).await.is_pending());
            assert_eq!(
                armed(),
                tick(early.at),
                "the driver re-arms for the earlier one"
            );
            assert!(armed() < Some(late_at));
            early.await;
            let first = start.elapsed();
            assert!(first >= Duration::from_millis(20), "{first:?}");
            let second = late.await.unwrap();
            assert!(second >= Duration::from_millis(60), "{second:?}");
            assert_eq!(entries(), 0);
        });
    }

    /// What an idle connection does (`keepalive::Cycled`): on every wake-up it resets its
    /// deadline to the same instant and polls it. Once fired it must stay fired, not be put
    /// back in the wheel to fire again for ever; moved later, it waits again.
    #[test]
    fn a_fired_deadline_reset_to_the_same_instant_stays_fired() {
        on_worker(async {
            let at = Instant::now() + Duration::from_millis(5);
            let mut d = Deadline::at(at);
            assert!(futures_poll_once(Pin::new(&mut d)).await.is_pending());
            // Until `drive` has fired it (taken it out of the wheel), polled with a bound.
            let give_up = Instant::now() + Duration::from_secs(10);
            while entries() > 0 && Instant::now() < give_up {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert_eq!(entries(), 0, "drive fired it");
            assert!(Instant::now() >= at);
            d.reset(at);
            assert!(futures_poll_once(Pin::new(&mut d)).await.is_ready());
            assert_eq!(entries(), 0);
            // Already due when first polled: pending until `drive` fires it, never early.
            let mut past = Deadline::at(Instant::now());
            assert!(futures_poll_once(Pin::new(&mut past)).await.is_pending());
            (&mut past).await;
            assert!(futures_poll_once(Pin::new(&mut past)).await.is_ready());
            let later = Instant::now() + Duration::from_secs(3600);
            d.reset(later);
            assert!(futures_poll_once(Pin::new(&mut d)).await.is_pending());
            assert_eq!(entries(), 1, "moved later, it waits in the wheel again");
        });
    }

    #[test]
    fn dropped_and_reset_deadlines_leave_the_wheel() {
        on_worker(async {
            let far = Deadline::after(Duration::from_secs(3600));
            let mut polled = Box::pin(far);
            assert!(futures_poll_once(polled.as_mut()).await.is_pending());
            assert_eq!(entries(), 1);
            drop(polled);
            assert_eq!(entries(), 0, "a dropped deadline is removed");

            let mut d = Deadline::after(Duration::from_secs(3600));
            assert!(futures_poll_once(Pin::new(&mut d)).await.is_pending());
            let keyed = |d: &Deadline| match d.state {
                State::Wheel { key, .. } => Some(key),
                _ => None,
            };
            let old = keyed(&d);
            d.reset(Instant::now() + Duration::from_millis(10));
            assert_eq!(
                entries(),
                1,
                "a reset deadline moves, it is not added twice"
            );
            assert_ne!(keyed(&d), old);
            d.await;
            assert_eq!(entries(), 0);
        });
    }

    /// hyper moves a connection's header read timeout later after every response: the entry
    /// stays where it was filed (no wheel operation), and when `drive` takes it the deadline
    /// is filed again at its new instant: it fires then, never at the old one.
    #[test]
    fn a_deadline_moved_later_fires_at_the_new_instant_only() {
        on_worker(async {
            let start = Instant::now();
            let mut d = Deadline::at(start + Duration::from_millis(10));
            assert!(futures_poll_once(Pin::new(&mut d)).await.is_pending());
            let filed = match d.state {
                State::Wheel { key, .. } => key,
                _ => panic!("filed in the wheel"),
            };
            for ms in [20, 30, 40] {
                d.reset(start + Duration::from_millis(ms));
            }
            let filed_now = match d.state {
                State::Wheel { key, .. } => key,
                _ => panic!("still in the wheel"),
            };
            assert_eq!(filed_now, filed, "moved later: the entry stays");
            assert_eq!(entries(), 1);
            d.await;
            assert!(start.elapsed() >= Duration::from_millis(40), "never early");
            assert_eq!(entries(), 0);

            // Moved later, then taken early by `drive`, then moved back to an instant that
            // has passed: due at once (the same answer as a remove and an insert give).
            let start = Instant::now();
            let mut d = Deadline::at(start + Duration::from_millis(5));
            assert!(futures_poll_once(Pin::new(&mut d)).await.is_pending());
            d.reset(start + Duration::from_secs(3600));
            let give_up = Instant::now() + Duration::from_secs(10);
            while entries() > 0 && Instant::now() < give_up {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert_eq!(entries(), 0, "drive took the entry filed at 5 ms");
            d.reset(start + Duration::from_millis(5));
            assert!(futures_poll_once(Pin::new(&mut d)).await.is_ready());
            // Moved later while its entry was taken: it waits in the wheel again.
            let mut d = Deadline::at(Instant::now() + Duration::from_millis(2));
            assert!(futures_poll_once(Pin::new(&mut d)).await.is_pending());
            d.reset(Instant::now() + Duration::from_secs(3600));
            while entries() > 0 && Instant::now() < give_up {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert!(futures_poll_once(Pin::new(&mut d)).await.is_pending());
            assert_eq!(entries(), 1, "filed again at its new instant");
        });
    }

    #[test]
    fn ticks_never_round_down_and_an_earlier_entry_rearms() {
        let epoch = Instant::now();
        let mut w = Wheel {
            id: 0,
            epoch,
            entries: TimerWheel::default(),
            armed: None,
            driver: None,
        };
        let at = |us: u64| epoch + Duration::from_micros(us);
        assert_eq!(w.tick(at(0)), 0);
        assert_eq!(w.tick(at(1)), 1, "a deadline 1 µs in is due at 1 ms, not 0");
        assert_eq!(w.tick(at(1000)), 1);
        assert_eq!(w.tick(at(1001)), 2);
        assert_eq!(w.now_tick(at(1999)), 1);
        let waker = std::task::Waker::noop().clone();
        let filed = |s: State| match s {
            State::Wheel { key, tick, .. } => (key, tick),
            _ => panic!("filed in the wheel"),
        };
        let (a, ta) = filed(w.insert(at(1500), waker.clone()));
        let (b, tb) = filed(w.insert(at(1700), waker.clone()));
        assert_eq!(w.armed, Some(2));
        let (_, tc) = filed(w.insert(at(900), waker));
        assert_ne!(a, b);
        assert_eq!((ta, tb, tc), (2, 2, 1));
        assert_eq!(w.entries.len(), 3);
        assert_eq!(w.armed, Some(1), "the earlier entry re-arms the driver");
        assert!(w.taken_is_due(at(1500), ta) && !w.taken_is_due(at(2001), ta));
    }

    #[test]
    fn timeout_elapses_or_passes_the_output_through() {
        on_worker(async {
            let slow = timeout(Duration::from_millis(10), std::future::pending::<()>()).await;
            assert_eq!(slow, Err(Elapsed));
            let quick = timeout(Duration::from_secs(60), async { 7 }).await;
            assert_eq!(quick, Ok(7));
            assert_eq!(entries(), 0);
        });
    }

    #[test]
    fn without_a_wheel_it_is_a_tokio_timer() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let start = Instant::now();
            Deadline::after(Duration::from_millis(15)).await;
            assert!(start.elapsed() >= Duration::from_millis(15));
            let mut d = Deadline::after(Duration::from_secs(3600));
            assert!(futures_poll_once(Pin::new(&mut d)).await.is_pending());
            assert!(matches!(d.state, State::Tokio(_)));
            d.reset(Instant::now());
            d.await;
        });
    }

    #[test]
    fn hyper_resets_the_same_deadline_in_place() {
        use hyper::rt::Timer;
        on_worker(async {
            let t = HyperTimer;
            let mut s = t.sleep(Duration::from_secs(3600));
            assert!(futures_poll_once(s.as_mut()).await.is_pending());
            let before: *const () = (&*s as *const dyn hyper::rt::Sleep).cast();
            t.reset(&mut s, Instant::now() + Duration::from_millis(5));
            let after: *const () = (&*s as *const dyn hyper::rt::Sleep).cast();
            assert_eq!(before, after, "reset reuses the box");
            s.await;
            assert_eq!(entries(), 0);
        });
    }

    /// Poll `f` once with the task's own waker.
    async fn futures_poll_once<F: Future + ?Sized>(mut f: Pin<&mut F>) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(f.as_mut().poll(cx))).await
    }
}
