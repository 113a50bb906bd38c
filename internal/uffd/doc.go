// Package uffd is a small wrapper over Linux's userfaultfd for serving guest
// page faults from a snapshot: guest RAM is mapped empty, registered here,
// and every page the guest or the VMM first touches is filled on demand
// (Firecracker's UFFD snapshot backend, Cloud Hypervisor's
// memory_restore_mode=ondemand). guestmem's RestoreOnDemand is built on it;
// guestmem, not this package, knows what a page should hold.
//
// # The model
//
//	Open(Config)              userfaultfd(2), or /dev/userfaultfd; UFFDIO_API handshake
//	  Register(addr, n)       UFFDIO_REGISTER_MODE_MISSING: a missing page now waits for us
//	    Serve(ctx, handler)   poll + read uffd_msg; handler per event, on several goroutines
//	      handler: Copy / ZeroPage / Poison      UFFDIO_COPY / _ZEROPAGE / _POISON, which wake the thread
//	  Unregister(addr, n)     done serving: the rest of the range takes the normal fault path
//	Close()                   faults still waiting get the Fallback; the descriptor is released
//
// A thread that touches a missing page of a registered range stops in the
// kernel, and a PageFault event is queued. The thread stays stopped until
// the page is filled — Copy (data), ZeroPage (zeros) or Poison (SIGBUS on
// access) — and woken (those do it, unless DontWake; Wake does it alone).
// The kernel's own accesses to the range (KVM mapping guest memory for a
// vCPU, read(2) or write(2) into it) fault the same way and wait in the
// system call.
//
// Open asks the kernel for the features the caller needs: Config.Required
// (missing ones are an error wrapping errors.ErrUnsupported) and
// Config.Optional (taken where offered); Features reports what was granted
// and Supported what the kernel offers. The useful ones here:
// FeatureMissingShmem and FeatureMissingHugetlbfs (registering memfd and
// hugetlb memory), FeatureEventRemove and FeatureEventUnmap (Remove and
// Unmap events), FeatureExactAddress, FeatureThreadID, and FeaturePoison
// (Linux 6.6; needed by the Poison fallback). The system call is refused
// without CAP_SYS_PTRACE when vm.unprivileged_userfaultfd is 0; Open then
// uses /dev/userfaultfd (Linux 6.1), whose node permissions decide. It never
// sets UFFD_USER_MODE_ONLY, which would turn the kernel's faults — KVM's —
// into SIGBUS.
//
// # Events and the handler loop
//
// Serve waits in poll(2) on the nonblocking descriptor, together with an
// eventfd written by Close and one written when its context is done, so
// neither Close nor cancellation waits for a fault to arrive. It reads up to
// 64 messages at a time and calls the handler for each: PageFault (Addr,
// Page and PageSize of the page to fill, Write, ThreadID), Remove
// (MADV_DONTNEED or MADV_REMOVE on [Start, End): the range stays registered
// and its pages fault again, to be served as zeros) and Unmap (munmap; the
// range is gone). ReadEvents is the same read without the bookkeeping, for a
// caller that wants to feed its own channel.
//
// Remove and Unmap events stop the thread doing the madvise or munmap until
// the event is read — so with those features granted, a Serve must be
// running (or Close under way) whenever registered memory is discarded or
// unmapped — and, while one is in flight, every Copy, ZeroPage and Poison
// fails with ErrAgain. A handler returns that error and Serve defers the
// fault: it reads the queued events, gives the handler the Remove and Unmap
// among them first, and then retries the fault.
//
// The madvise returns as soon as its event is read, before any handler has
// seen it, and the dropped pages can fault again at once. With several Serve
// loops, such a fault could reach a handler before the Remove does, and be
// served from the snapshot instead of as zeros. Serve prevents that: the
// loops read one at a time, number the Remove and Unmap events in the
// kernel's order, hand the events of a batch to the handler before its
// faults (the kernel lists faults first), and hand faults over only after
// every such event read before them has been handled (TestRemoveEvent fails
// without it). A handler that records removed ranges and serves zeros for
// them is then correct for every fault read with or after the event. A
// fault read before it, racing with the discard of its own page, may be
// filled from the snapshot after the zap, and keep that data; the guest
// raced with itself there (Firecracker's on-demand handler notes discuss
// the same). Events read with ReadEvents are outside this ordering.
//
// The result of each fill matters:
//
//   - ErrPresent (EEXIST): the page is already there — another server won the
//     race, or the page cache of shared memory had it. For a caller that
//     wants the page present it is success, and Serve treats it so. Copy,
//     ZeroPage and Poison wake the range's waiters on EEXIST (the kernel
//     does not), so a thread whose page was filled behind the
//     userfaultfd's back is not left waiting.
//   - ErrAgain (EAGAIN): see above. A partial fill (the kernel's count is
//     positive) is continued from where it stopped; ErrAgain is returned
//     only when nothing more could be done, with the count done so far.
//   - ErrUnmapped (ENOENT) and ErrExited (ESRCH): the range or the process
//     went away; there is nothing left to serve.
//
// # Concurrency
//
// Every method of Userfaultfd is safe for concurrent use. Any number of
// Serve loops may run, one per goroutine, and each event goes to exactly
// one (they take turns to poll and read, which costs nothing the kernel
// would not serialize anyway); handlers run concurrently and may Copy into
// the same page (one wins,
// the others get ErrPresent; the data is never torn, as UFFDIO_COPY installs
// the page atomically). Copy, ZeroPage, Poison and Wake may also be called
// from goroutines that are not serving (a background prefetcher copying the
// rest of the snapshot). Register, Unregister and the reading of Unmap
// events are serialized among themselves. Handlers run with no lock of the
// Userfaultfd held and may call anything, Close included. Each system call
// on the descriptor holds a read lock that Close takes for writing, so the
// descriptor number is never closed under a call and reused; a waiting
// poll is woken by Close first.
//
// # Faults nobody serves, and Close
//
// A fault that gets no data must still be resolved, or its thread — a vCPU,
// a device's goroutine — waits for ever. Config.Fallback, which has no
// default, says how: Poison (the thread, and any later access to the page,
// gets SIGBUS: an arena accessor returns ErrFault, a vCPU takes KVM's
// hardware-poison path; nobody reads data the snapshot did not hold) or
// ZeroFill (the thread reads zeros). Serve applies it when a handler fails,
// and Close applies it to every fault still queued or read by a Serve and
// not yet served.
//
// A fault that Close cannot see is not resolved by it: a thread whose wait a
// signal interrupted (the Go runtime's preemption signal does this to a Go
// thread stopped in a userfault; a VMM's vCPU kick does it to KVM_RUN) is
// off the queue until its access is retried, and if Close drains the queue
// in that instant, the retried access takes the normal fault path described
// next. A fault whose page Close did resolve is safe either way: the
// retried access finds the page poisoned or zeroed.
//
// Close then releases the descriptor, and the kernel unregisters every range
// and wakes any fault that came in meanwhile. From that point a page that
// was never served fills from the kernel's normal fault path — zeros for
// anonymous memory, the page cache or zeros for shmem and hugetlbfs — as if
// the userfaultfd had never existed: a host thread reading it later gets
// zeros, not the snapshot's data, and nothing says so. The caller must
// therefore close only once every data page is served or the memory is
// unmapped. To make the mistake loud rather than silent, Close reports it:
// ranges still registered (neither Unregistered nor unmapped) when it runs
// are released all the same, and its error wraps ErrRegistered and names
// them. Unregister is the explicit way to say "the rest may come from the
// normal fault path".
//
// # Go and faulting threads
//
// A goroutine stopped in a userfault is, to the Go scheduler, running: it
// keeps its P. That is harmless when the fault happens inside a system call
// (KVM_RUN, read(2)), where the thread is in the syscall state. A fault
// raised by Go code is another matter:
//
//   - With GOMAXPROCS goroutines stopped in faults, no P is left for the
//     Serve loops, until sysmon preempts one of them (every 10 to 20 ms).
//     Keep such goroutines well below GOMAXPROCS (the tests raise it when
//     they start many).
//   - Preemption, and so a stop-the-world for the garbage collector, reaches
//     such a goroutine only asynchronously: the signal interrupts the
//     kernel's wait and the access is retried after the goroutine resumes.
//     That works for ordinary Go code, not for runtime assembly (memmove, so
//     copy(), and bytes.Equal), which is never preempted asynchronously: a
//     collection that starts while such a copy waits on an unserved page
//     waits for it, and the goroutine that would serve it cannot run.
//
// So host code must not copy out of registered memory that may be
// unserved: populate it first (Copy it in, or MADV_POPULATE_WRITE, which
// faults in the kernel), or reach it through a system call. The tests touch
// pages with plain Go loads on a thread of their own (a faulting thread is
// stopped), and compare only pages already present. A race-detector build
// also precedes every Go store with a nil-check load, so a Go write to a
// missing page arrives as a read fault there.
//
// # Errors
//
// Errors name the package once, at the start. Failed ioctls are *OpError
// (operation, range, bytes done, the *os.SyscallError), which matches
// ErrPresent, ErrAgain, ErrUnmapped and ErrExited by errno, and the errno
// itself. Calls after Close wrap fs.ErrClosed; bad arguments fs.ErrInvalid;
// features the kernel lacks errors.ErrUnsupported; a userfaultfd this
// process may not make fs.ErrPermission.
//
// This package does not use UFFDIO_CONTINUE (minor faults), write-protect
// mode, UFFDIO_MOVE or the fork and remap events.
package uffd
