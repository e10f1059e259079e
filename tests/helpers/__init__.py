"""Modules the tests share: run and store builders, and the scripts the crash tests start as children."""
