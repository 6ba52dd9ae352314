"""Local candidates and domain sets, built on this machine from text it already has."""
