"""anyid_rt: inference runtime for identity-preserving video generation (AnyID on Wan2.2-TI2V-5B)."""
