"""`xenguest -mode listen`: xenguest's part of EMP, saving and restoring domain memory."""
from __future__ import annotations

from xenemu import Domain, Host

from .compressed import CompressedPages
from .empserver import EmpServer, Work
from .log import Log
from .restore import Restorer
from .precopy import Policy
from .save import PlainPages, Saver


class Server(EmpServer):
    def __init__(self, host: Host, domid: int, *, compress: bool, log: Log) -> None:
        super().__init__(host, domid, host.xenguest_socket(domid), log=log)
        self.compress = compress

    def _domain(self) -> Domain:
        return self.host.domain(self.domid)

    def track_dirty(self) -> None:
        self._domain().memory.clean_all()

    def save(self, live: bool) -> Work:
        assert self.stream_fd is not None
        saver = Saver(self._domain(), self.stream_fd, live=live, policy=Policy.from_env(),
                      suspend=self.wait_paused if live else (lambda: None), on_progress=self.progress,
                      encoder=CompressedPages() if self.compress else PlainPages(),
                      abort=self.abort, pause_requested=self.pause_requested)

        def work() -> str:
            self.log.info(saver.run().summary(self.domid))
            return "0 0"
        return work

    def restore(self) -> Work:
        domain = self._domain()
        assert self.stream_fd is not None
        if domain.state != "building":
            raise ValueError(f"domain {self.domid} is {domain.state}; restore needs a new domain")
        restorer = Restorer(domain, self.stream_fd)

        def work() -> str:
            result = restorer.run()
            return f"{result.store_mfn} {result.console_mfn}"
        return work
