"""xenopsd_shim"""
