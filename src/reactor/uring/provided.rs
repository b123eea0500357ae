//! The provided-buffer group: pooled receive buffers lent to the kernel
//! for buffer-selecting receives, as many as recent demand calls for.

use super::*;

impl UringBackend {
    /// Keeps enough pooled buffers provided to the kernel for the
    /// receives waiting on the group (see [`PROVIDED_MIN`]).
    pub(super) fn replenish(&mut self, pool: &mut BufferPool) {
        let want = PROVIDED_MIN
            .max(self.demand + self.demand / 2)
            .min(PROVIDED_MAX);
        let target = want.min(self.selecting + 1);
        while self.provided_count < target {
            let bid = match self.provided.iter().position(Option::is_none) {
                Some(i) => i,
                None => {
                    self.provided.push(None);
                    self.provided.len() - 1
                }
            };
            let mut buf = pool.take_recv();
            let len = buf.capacity().min(i32::MAX as usize) as i32;
            let ptr = buf.as_mut_ptr();
            self.provided[bid] = Some(buf);
            self.provided_count += 1;
            let key = self.insert_op(Op::Provide { bid: bid as u16 });
            let entry = opcode::ProvideBuffers::new(ptr, len, 1, BGID, bid as u16).build();
            // SAFETY: the buffer stays in `self.provided[bid]` until a
            // completion names it or the backend is torn down.
            unsafe { self.push(entry.user_data(key)) };
        }
    }
}
