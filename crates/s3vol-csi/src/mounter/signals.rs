//! The signals that end the mounter: SIGTERM and SIGINT, blocked in every thread and taken with
//! `sigwait` (the way PID 1 must take them: the kernel drops a default-action signal sent to a
//! namespace's init). A blocked mask survives exec, so every serving process unblocks them
//! before it runs (`volume`).

use std::io;

/// Blocks SIGTERM and SIGINT in the calling thread and every thread it starts later, so that
/// [`super::run`] can take them with `sigwait`. Call it first thing, before any other thread
/// exists.
pub fn block_shutdown_signals() -> io::Result<()> {
    let set = shutdown_set();
    // SAFETY: pthread_sigmask with a valid, initialised set and no old-set pointer.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// SIGTERM and SIGINT. Only fills a `sigset_t` on the stack: safe between fork and exec.
pub(super) fn shutdown_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset adds valid signal numbers to it.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Waits for SIGTERM or SIGINT (blocked beforehand by [`block_shutdown_signals`]).
pub(super) fn wait_for_shutdown_signal() -> i32 {
    let set = shutdown_set();
    loop {
        let mut sig = 0;
        // SAFETY: sigwait with a valid set and a valid out pointer.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            return sig;
        }
    }
}
