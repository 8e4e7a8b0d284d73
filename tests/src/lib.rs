// SPDX-License-Identifier: Apache-2.0
//! Shared helpers for the integration tests in `tests/tests/`.
