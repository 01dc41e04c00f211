"""What more than one executable speaks or reads, as Xen keeps its stream formats in xen/migration/.

Formats: `image` (xenopsd's suspend-image framing, with `sexp` for its Xenops
record), `libxc` (the libxc migration stream v3 and its page encoders),
`compressed` (this project's COMPRESSED_PAGE_DATA record). Protocols:
`control` (xenopsd <-> emu-manager pipes), `emp` (emu-manager <-> emulators)
and `empserver` (the emulator side of EMP), `precopy` (the saver's pre-copy
interface). Common: `fdio`, `longopts`, `log`. The executables' packages use
this one and `xenemu`, never each other: they talk through processes.
"""
