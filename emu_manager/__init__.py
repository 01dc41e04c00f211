"""emu_manager"""
