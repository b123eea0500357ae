//! Cheap fork detection: a counter bumped in the child after every `fork`,
//! so checking "am I still the creating process?" costs a load, not a
//! `getpid` syscall per call.

use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};

static GENERATION: AtomicU64 = AtomicU64::new(0);
static REGISTER: Once = Once::new();

extern "C" fn in_child() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// The current fork generation of this process (changes in a forked child).
pub fn generation() -> u64 {
    REGISTER.call_once(|| {
        // SAFETY: registers a handler that only touches an atomic, which is
        // async-signal-safe and valid in a freshly forked child.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
        if rc != 0 {
            log::warn!("pthread_atfork failed ({rc}); fork detection falls back to getpid");
        }
    });
    GENERATION.load(Ordering::Relaxed)
}

/// [`generation`] for a caller that has called it before (every client
/// did, when it was made), so the child handler is registered: one load.
#[inline(always)]
pub fn generation_registered() -> u64 {
    GENERATION.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forked_child_sees_a_new_generation() {
        let before = generation();
        // SAFETY: the child only reads an atomic and exits without running
        // destructors or touching locks.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let code = if generation() != before { 0 } else { 1 };
            // SAFETY: `_exit` ends the child immediately.
            unsafe { libc::_exit(code) };
        }
        assert!(pid > 0);
        let mut status = 0;
        // SAFETY: waits for the child created above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        assert_eq!(generation(), before, "the parent's generation is unchanged");
    }
}
