#include "textflag.h"

// Atomics on mapped memory; see atomic_unsafe.go for why they are assembly.
// On x86-64 an aligned MOV is an atomic load, and XCHG and LOCK-prefixed
// instructions are full barriers, which makes every operation here
// sequentially consistent, as sync/atomic's are.

// func atomicLoad32(addr uintptr) uint32
TEXT ·atomicLoad32(SB), NOSPLIT, $0-12
	MOVQ	addr+0(FP), BX
	MOVL	(BX), AX
	MOVL	AX, ret+8(FP)
	RET

// func atomicLoad64(addr uintptr) uint64
TEXT ·atomicLoad64(SB), NOSPLIT, $0-16
	MOVQ	addr+0(FP), BX
	MOVQ	(BX), AX
	MOVQ	AX, ret+8(FP)
	RET

// func atomicStore32(addr uintptr, v uint32)
TEXT ·atomicStore32(SB), NOSPLIT, $0-12
	MOVQ	addr+0(FP), BX
	MOVL	v+8(FP), AX
	XCHGL	AX, (BX)
	RET

// func atomicStore64(addr uintptr, v uint64)
TEXT ·atomicStore64(SB), NOSPLIT, $0-16
	MOVQ	addr+0(FP), BX
	MOVQ	v+8(FP), AX
	XCHGQ	AX, (BX)
	RET

// func atomicCAS32(addr uintptr, old, newV uint32) bool
TEXT ·atomicCAS32(SB), NOSPLIT, $0-17
	MOVQ	addr+0(FP), BX
	MOVL	old+8(FP), AX
	MOVL	newV+12(FP), CX
	LOCK
	CMPXCHGL	CX, (BX)
	SETEQ	ret+16(FP)
	RET

// func atomicCAS64(addr uintptr, old, newV uint64) bool
TEXT ·atomicCAS64(SB), NOSPLIT, $0-25
	MOVQ	addr+0(FP), BX
	MOVQ	old+8(FP), AX
	MOVQ	newV+16(FP), CX
	LOCK
	CMPXCHGQ	CX, (BX)
	SETEQ	ret+24(FP)
	RET

// func atomicAdd32(addr uintptr, delta uint32) uint32
TEXT ·atomicAdd32(SB), NOSPLIT, $0-20
	MOVQ	addr+0(FP), BX
	MOVL	delta+8(FP), AX
	MOVL	AX, CX
	LOCK
	XADDL	AX, (BX)
	ADDL	CX, AX
	MOVL	AX, ret+16(FP)
	RET
