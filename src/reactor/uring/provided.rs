//! The provided-buffer group: pooled receive buffers lent to the kernel
//! for buffer-selecting receives, as many as recent demand calls for.

use super::*;

/// The provided buffers and the demand for them.
#[derive(Debug, Default)]
pub(super) struct ProvidedBufs {
    /// By buffer id: a buffer lent to the kernel, or a free id.
    pub(super) bufs: Vec<Option<BytesMut>>,
    /// Buffers lent to the kernel now.
    pub(super) count: usize,
    /// Armed receives that select a provided buffer.
    pub(super) selecting: usize,
    /// Buffer-selecting receives that completed (with data or `ENOBUFS`)
    /// in recent reaps: a decaying maximum.
    pub(super) demand: usize,
}

impl UringBackend {
    /// Keeps enough pooled buffers provided to the kernel for the
    /// receives waiting on the group (see [`PROVIDED_MIN`]).
    pub(super) fn replenish(&mut self, pool: &mut BufferPool) {
        let want = PROVIDED_MIN
            .max(self.provided.demand + self.provided.demand / 2)
            .min(PROVIDED_MAX);
        let target = want.min(self.provided.selecting + 1);
        while self.provided.count < target {
            let bid = match self.provided.bufs.iter().position(Option::is_none) {
                Some(i) => i,
                None => {
                    self.provided.bufs.push(None);
                    self.provided.bufs.len() - 1
                }
            };
            let mut buf = pool.take_recv();
            // Up to the window: a frame left incomplete at the end is
            // completed in the slack behind it.
            let len = pool.window(buf.capacity()).min(i32::MAX as usize) as i32;
            let ptr = buf.as_mut_ptr();
            self.provided.bufs[bid] = Some(buf);
            self.provided.count += 1;
            let key = self.insert_op(Op::Provide { bid: bid as u16 });
            let entry = opcode::ProvideBuffers::new(ptr, len, 1, BGID, bid as u16).build();
            // SAFETY: the buffer stays in `self.provided.bufs[bid]` until a
            // completion names it or the backend is torn down.
            unsafe { self.push(entry.user_data(key)) };
        }
    }

    /// Takes back the provided buffer `bid` that a completion names.
    pub(super) fn take_provided(&mut self, bid: u16) -> Option<BytesMut> {
        let b = self
            .provided
            .bufs
            .get_mut(bid as usize)
            .and_then(Option::take);
        if b.is_some() {
            self.provided.count -= 1;
        }
        b
    }

    /// A `PROVIDE_BUFFERS` completed: on failure the buffer is not the
    /// kernel's after all.
    pub(super) fn provide_done(&mut self, bid: u16, res: i32) {
        if res < 0 {
            log::error!(
                "io_uring: providing a receive buffer failed: {}",
                io::Error::from_raw_os_error(-res)
            );
            self.take_provided(bid);
        }
    }
}
