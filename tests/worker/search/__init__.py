"""Tests of the search engine library (worker.search)."""
