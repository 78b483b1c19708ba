"""How large the shared-memory window and the fused experts + combine rounds are, from the
config: the transport's sizing policy, in one place (the notation of dispatcher.py)."""


def window_slot_bytes(config):
    """Shared memory per ordered rank pair: by default one full step of the largest message.

    Without fused decode operators the slot holds at most DEFAULT_SLOT_BYTES: large payloads
    travel by single copy (or, where the kernel forbids it, in slot-sized chunks), so a larger
    slot would only cost /dev/shm. With them (a dropless layer), the slot holds a whole step of
    the partial sums that the fused Return (or Combine, with ``decode_layout: grouped``) sends
    back, up to SHARED_ROWS_MAX_SLOT_BYTES: the source then sums its peers' rows where they lie
    in the window instead of copying them (ShareRows).
    """
    if config.dispatch.window_slot_bytes is not None:
        return config.dispatch.window_slot_bytes
    from .window import DEFAULT_SLOT_BYTES, SHARED_ROWS_MAX_SLOT_BYTES
    element_bytes = 4 if config.runtime.dtype == "float32" else 2
    top_k, max_tokens_per_rank = config.router.top_k, config.dispatch.max_tokens_per_rank
    # token row + K local ids (int32) + K routing weights (float32): the fused decode operators'
    # packed message (where they pull, only the ids and weights travel as notes)
    largest_row = config.model.hidden_size * element_bytes + 2 * top_k * 4
    whole_step = max_tokens_per_rank * largest_row
    return_step = max_tokens_per_rank * config.model.hidden_size * element_bytes  # partial sums
    if config.router.capacity_factor is None and return_step <= SHARED_ROWS_MAX_SLOT_BYTES:
        return max(return_step, min(whole_step, DEFAULT_SLOT_BYTES))
    return min(whole_step, DEFAULT_SLOT_BYTES)


def combine_round_rows(config, world_size):
    """Rows per source in one round of the fused experts + combine, or None where the unfused
    path holds less: the fused kernel's buffers (a round's partial sums to send and returned
    rows, R x B rows each, and the output, C rows) against the unfused partial sums (R x C)."""
    max_tokens_per_rank = config.dispatch.max_tokens_per_rank
    round_rows = min(config.dispatch.combine_round_tokens, max_tokens_per_rank)
    if 2 * world_size * round_rows + max_tokens_per_rank >= world_size * max_tokens_per_rank:
        return None
    return round_rows
