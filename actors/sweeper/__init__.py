"""Discovery sweeper actor: every transport's discovery, concurrently."""
