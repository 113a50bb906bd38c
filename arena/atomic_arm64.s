#include "textflag.h"

// Atomics on mapped memory; see atomic_unsafe.go for why they are assembly.
// Load-acquire (LDAR) and store-release (STLR) are sequentially consistent
// with each other on arm64, as sync/atomic's loads and stores are.
// Compare-and-swap and add are LDAXR/STLXR loops, so no LSE atomics
// (ARMv8.1) are needed.

// func atomicLoad32(addr uintptr) uint32
TEXT ·atomicLoad32(SB), NOSPLIT, $0-12
	MOVD	addr+0(FP), R0
	LDARW	(R0), R1
	MOVW	R1, ret+8(FP)
	RET

// func atomicLoad64(addr uintptr) uint64
TEXT ·atomicLoad64(SB), NOSPLIT, $0-16
	MOVD	addr+0(FP), R0
	LDAR	(R0), R1
	MOVD	R1, ret+8(FP)
	RET

// func atomicStore32(addr uintptr, v uint32)
TEXT ·atomicStore32(SB), NOSPLIT, $0-12
	MOVD	addr+0(FP), R0
	MOVW	v+8(FP), R1
	STLRW	R1, (R0)
	RET

// func atomicStore64(addr uintptr, v uint64)
TEXT ·atomicStore64(SB), NOSPLIT, $0-16
	MOVD	addr+0(FP), R0
	MOVD	v+8(FP), R1
	STLR	R1, (R0)
	RET

// func atomicCAS32(addr uintptr, old, newV uint32) bool
TEXT ·atomicCAS32(SB), NOSPLIT, $0-17
	MOVD	addr+0(FP), R0
	MOVW	old+8(FP), R1
	MOVW	newV+12(FP), R2
cas32loop:
	LDAXRW	(R0), R3
	CMPW	R1, R3
	BNE	cas32done
	STLXRW	R2, (R0), R3
	CBNZ	R3, cas32loop
cas32done:
	CSET	EQ, R0
	MOVB	R0, ret+16(FP)
	RET

// func atomicCAS64(addr uintptr, old, newV uint64) bool
TEXT ·atomicCAS64(SB), NOSPLIT, $0-25
	MOVD	addr+0(FP), R0
	MOVD	old+8(FP), R1
	MOVD	newV+16(FP), R2
cas64loop:
	LDAXR	(R0), R3
	CMP	R1, R3
	BNE	cas64done
	STLXR	R2, (R0), R3
	CBNZ	R3, cas64loop
cas64done:
	CSET	EQ, R0
	MOVB	R0, ret+24(FP)
	RET

// func atomicAdd32(addr uintptr, delta uint32) uint32
TEXT ·atomicAdd32(SB), NOSPLIT, $0-20
	MOVD	addr+0(FP), R0
	MOVW	delta+8(FP), R1
add32loop:
	LDAXRW	(R0), R2
	ADDW	R1, R2, R2
	STLXRW	R2, (R0), R3
	CBNZ	R3, add32loop
	MOVW	R2, ret+16(FP)
	RET
