"""Everything that makes the single-device model run on many ranks lives here."""
