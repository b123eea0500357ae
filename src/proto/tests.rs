//! Core tests live here.
