"""See DESIGN §4; filled by later issues."""
