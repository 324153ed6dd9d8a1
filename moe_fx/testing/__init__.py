"""Test tools shipped with moe_fx. Nothing here is imported by moe_fx itself."""
