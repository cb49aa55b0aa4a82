"""Everything that runs on a participant's device."""
