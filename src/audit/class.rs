//! The writer thread's scheduling class.
//!
//! On a core it shares with the tokio workers, every run of the writer (encoding,
//! hashing, `write`, `fsync`: tens of microseconds) delays whatever request arrives
//! meanwhile; that is most of what the proxy adds at p99. In the idle class
//! (`SCHED_IDLE`) the writer runs only while the workers wait, and a worker that wakes
//! takes the core back at once. But a saturated core leaves an idle-class thread almost
//! nothing, so once [`BEHIND`] records are queued the request path moves the writer
//! back to the normal class. It stays there for [`STAY_NORMAL`] (under sustained load
//! it takes small batches as a normal thread, not a starved one's backlog at once)
//! and returns to the idle class at the first take after that which finds at most
//! [`CAUGHT_UP`] records. Leaving the idle class takes `CAP_SYS_NICE` (or an
//! `RLIMIT_NICE` that allows it): a process that could not leave it never enters it,
//! and its writer stays in the normal class throughout.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::lock;

/// Queued records at which the writer is moved to the normal class: about a millisecond
/// of its work, which a starved writer then does at once.
pub(super) const BEHIND: usize = 256;
/// Records a take may find for the writer to go back to the idle class.
pub(super) const CAUGHT_UP: usize = 64;
/// How long a writer moved to the normal class stays there at least.
pub(super) const STAY_NORMAL: Duration = Duration::from_secs(1);

/// Where the writer thread stands; shared by the writer and the request path.
#[derive(Default)]
pub(super) struct WriterClass {
    /// The writer thread, once it has entered the idle class.
    thread: OnceLock<Thread>,
    /// The writer is in the idle class.
    idle: AtomicBool,
    /// When the writer was last moved to the normal class.
    moved: Mutex<Option<Instant>>,
}

impl WriterClass {
    /// Called by the writer thread at its start: enters the idle class if this process
    /// may leave it again.
    pub(super) fn enter(&self) {
        if !may_leave_idle() {
            tracing::debug!("the audit writer stays in the normal scheduling class");
            return;
        }
        let me = Thread::current();
        if me.set(Class::Idle) {
            let _ = self.thread.set(me);
            self.idle.store(true, Ordering::Release);
        }
    }

    /// Called by the request path with the number of queued records: a writer that has
    /// fallen behind goes back to the normal class.
    pub(super) fn queued(&self, records: usize) {
        if records >= BEHIND
            && self.idle.load(Ordering::Relaxed)
            && self.idle.swap(false, Ordering::AcqRel)
        {
            let Some(thread) = self.thread.get() else {
                return;
            };
            *lock(&self.moved) = Some(Instant::now());
            if thread.set(Class::Normal) {
                tracing::debug!(records, "audit writer behind: normal scheduling class");
            } else {
                // Still idle: the next record tries again.
                self.idle.store(true, Ordering::Release);
            }
        }
    }

    /// Called by the writer thread after each take: back to the idle class once caught up.
    pub(super) fn taken(&self, records: usize) {
        let Some(thread) = self.thread.get() else {
            return;
        };
        if records > CAUGHT_UP || self.idle.load(Ordering::Acquire) {
            return;
        }
        let stayed = lock(&self.moved).is_none_or(|moved| moved.elapsed() >= STAY_NORMAL);
        if stayed && thread.set(Class::Idle) {
            self.idle.store(true, Ordering::Release);
        }
    }
}

#[derive(Clone, Copy)]
enum Class {
    Idle,
    Normal,
}

/// Tries both moves on a thread of its own, so that a process that cannot come back
/// leaves no thread of its own behind in the idle class.
fn may_leave_idle() -> bool {
    std::thread::Builder::new()
        .name("audit-class".into())
        .spawn(|| {
            let me = Thread::current();
            me.set(Class::Idle) && me.set(Class::Normal)
        })
        .ok()
        .and_then(|probe| probe.join().ok())
        .unwrap_or(false)
}

#[cfg(target_os = "linux")]
struct Thread(thread_priority::ThreadId);

#[cfg(target_os = "linux")]
impl Thread {
    fn current() -> Thread {
        Thread(thread_priority::thread_native_id())
    }

    fn set(&self, class: Class) -> bool {
        use thread_priority::{NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy};
        let policy = match class {
            Class::Idle => NormalThreadSchedulePolicy::Idle,
            Class::Normal => NormalThreadSchedulePolicy::Other,
        };
        thread_priority::set_thread_priority_and_policy(
            self.0,
            ThreadPriority::Os(Default::default()),
            ThreadSchedulePolicy::Normal(policy),
        )
        .is_ok()
    }
}

/// Elsewhere the writer keeps the normal class.
#[cfg(not(target_os = "linux"))]
struct Thread;

#[cfg(not(target_os = "linux"))]
impl Thread {
    fn current() -> Thread {
        Thread
    }

    fn set(&self, _class: Class) -> bool {
        false
    }
}
