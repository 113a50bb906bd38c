package guestmem

// WithNodeRoot is withNodeRoot, for the external tests.
var WithNodeRoot = withNodeRoot
