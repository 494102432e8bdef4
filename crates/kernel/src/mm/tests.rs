//! Tests of the memory manager's operations.

use super::*;

#[test]
fn page_rounding() {
    assert_eq!(page_up(1), 4096);
    assert_eq!(page_up(4096), 4096);
    assert_eq!(huge_up(1), 2 << 20);
    assert_eq!(huge_down((2 << 20) + 5), 2 << 20);
}
