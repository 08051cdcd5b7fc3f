//! One background thread for cleanup that nobody should wait for: the last close of a task's
//! mount namespace (its whole tree unmounted, then an RCU grace period, about 0.3 ms) and the
//! removal of its cgroups (an rmdir per hierarchy, about 0.1 ms). A task's exit is reported
//! without them. Jobs run in the order they were queued; [`flush`] waits for all of them.

use std::sync::{mpsc, OnceLock};

type Job = Box<dyn FnOnce() + Send>;

/// The worker's queue, if the worker runs in this process: a forked child inherits the queue
/// but not the thread.
fn worker() -> Option<&'static mpsc::Sender<Job>> {
    static WORKER: OnceLock<Option<(u32, mpsc::Sender<Job>)>> = OnceLock::new();
    WORKER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name("agentnode-close".into())
                .spawn(move || {
                    for job in rx {
                        crate::background::quiet::wait();
                        job();
                    }
                })
                .ok()
                .map(|_| (std::process::id(), tx))
        })
        .as_ref()
        .filter(|(owner, _)| *owner == std::process::id())
        .map(|(_, tx)| tx)
}

/// Runs `job` on the background thread, or here when that thread could not start, has died,
/// or belongs to the process this one was forked from.
pub fn later(job: impl FnOnce() + Send + 'static) {
    let job: Job = Box::new(job);
    match worker() {
        Some(tx) => {
            if let Err(mpsc::SendError(job)) = tx.send(job) {
                job();
            }
        }
        None => job(),
    }
}

/// Waits until every job queued before this call has run. Never call it from a job.
pub fn flush() {
    let (tx, rx) = mpsc::channel::<()>();
    later(move || {
        let _ = tx.send(());
    });
    let _ = rx.recv();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn jobs_run_in_order_and_flush_waits_for_them() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        for i in 0..100 {
            let (seen, count) = (seen.clone(), count.clone());
            later(move || {
                std::thread::sleep(std::time::Duration::from_micros(10));
                seen.lock().unwrap().push(i);
                count.fetch_add(1, Ordering::SeqCst);
            });
        }
        flush();
        assert_eq!(count.load(Ordering::SeqCst), 100);
        assert_eq!(*seen.lock().unwrap(), (0..100).collect::<Vec<_>>());
    }
}
