"""vgpu-emu: an emulated vGPU device model (the role of demu), driven by emu-manager over EMP."""
