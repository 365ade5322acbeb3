"""``/fork K`` in the app: the last image rendered again from its step K with the prompt, CFG or
sampler as they are now (the engine resumes from the state it kept after that step: only the
remaining steps run). A part of :class:`sdterm.ui.app.SdtermApp` (a mixin)."""

from __future__ import annotations

from ..errors import ConfigError


class Forking:
    def fork_command(self, outcome) -> None:
        """``/fork K`` (``outcome.message``: K): render the last image again from its step K."""
        from ..engine.fork import Fork, check, from_parent

        step = int(outcome.message)
        parent = self.last_result
        trail = getattr(parent, "trail", None)
        if parent is None or trail is None:
            self.notice("/fork K: nothing to fork yet: render an image, then fork it from one of its steps", "warning")
            return
        if not 0 <= step < len(trail):
            self.notice(f"/fork K: the last render made {len(trail)} steps: K from 0 to {len(trail) - 1}", "error")
            return
        try:
            current = self.session.rerender()
            req = from_parent(current, parent.request).validated()  # the seed, size, steps... its latent holds
            fork = Fork(parent.request, trail[step - 1]) if step else None
            if fork is not None:
                check(fork, req)
        except ConfigError as exc:
            self.notice(str(exc), "error")
            return
        self._fork_next = (fork, {"parent": self.session.last_path, "step": step})
        self.render_request(req, single=True)

    def take_fork(self):
        """The fork the next render starts from and what the history records of it: (None, None) for
        a render that is not a fork."""
        fork, record = getattr(self, "_fork_next", None) or (None, None)
        self._fork_next = None
        return fork, record
