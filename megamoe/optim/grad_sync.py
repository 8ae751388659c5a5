"""Overlapping the gradient reduction with backward (--overlap-grad-reduce).

During the last micro-batch's backward, each bucket's collective is launched as soon as every
parameter in it has accumulated its gradient, so communication runs under the rest of the
backward.  Earlier micro-batches run inside ``optimizer.no_sync()`` and only accumulate.

Every rank must issue its collectives in the same order, group by group, or they pair up wrongly
(or deadlock).  Readiness order can differ between ranks (timing), so buckets are launched in one
static order shared by all ranks -- the order of their first parameter in the backward-ordered
buffers, dense and expert buffers interleaved -- and a ready bucket waits for every bucket before
it.  ``launch_remaining`` (called from ``finish_grad_sync``) launches what backward did not, in
the same order; a parameter that got no gradient therefore delays, but never breaks, the overlap.
"""

from __future__ import annotations

from megamoe.optim.grad_buffer import GradBuffer


class OverlappedGradSync:
    def __init__(self, buffers: list[GradBuffer]) -> None:
        slots = [(bucket.params[0].start / max(1, buf.main_grad.numel()), b, i, buf)
                 for b, buf in enumerate(buffers) for i, bucket in enumerate(buf.buckets)]
        # Static order: by relative position in its buffer (the buffers are all in reverse
        # registration order, i.e. roughly the order backward produces gradients), then buffer index.
        self.order = [(buf, i) for _, _, i, buf in sorted(slots, key=lambda s: (s[0], s[1], s[2]))]
        self.buffers = buffers
        self.enabled = True
        for buf in buffers:
            buf.on_param_ready = self._param_ready
        self.reset()

    def reset(self) -> None:
        """Before the first micro-batch of a step (``zero_grad``)."""
        self.remaining = {(id(buf), i): len(bucket.params) for buf in self.buffers for i, bucket in enumerate(buf.buckets)}
        self.next = 0

    @property
    def launched(self) -> int:
        """How many buckets have been launched this step."""
        return self.next

    def _param_ready(self, buf: GradBuffer, bucket_index: int) -> None:
        if not self.enabled:
            return
        key = (id(buf), bucket_index)
        if self.remaining[key] == 0:
            raise RuntimeError(
                "a gradient arrived for a bucket whose reduction was already launched: with "
                "--overlap-grad-reduce, run every micro-batch but the last inside optimizer.no_sync()"
            )
        self.remaining[key] -= 1
        while self.next < len(self.order):
            buf, i = self.order[self.next]
            if self.remaining[(id(buf), i)] != 0:
                break
            buf.start_bucket_sync(i)
            self.next += 1

    def launch_remaining(self) -> None:
        """Launch every bucket not launched yet, in the static order."""
        while self.next < len(self.order):
            buf, i = self.order[self.next]
            self.remaining[(id(buf), i)] = 0
            buf.start_bucket_sync(i)
            self.next += 1
