/* guard-probe: make the syscalls the guard filter must refuse, print the results.
 *
 * Each line is "NAME RESULT" where RESULT is the raw return (negative errno):
 *   i386_getpid   getpid (20) through the IA-32 entry, int $0x80
 *   x32_getpid    getpid (39) with the x32 bit (0x40000000) on the 64-bit entry
 *   native_getpid getpid through the normal 64-bit entry (must succeed)
 */
#include <stdio.h>

static long native_syscall0(long nr)
{
	long ret;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(nr) : "rcx", "r11", "memory");
	return ret;
}

static long i386_syscall0(long nr)
{
	long ret;
	__asm__ volatile("int $0x80" : "=a"(ret) : "a"(nr) : "memory");
	return ret;
}

int main(void)
{
	printf("i386_getpid %ld\n", i386_syscall0(20));
	printf("x32_getpid %ld\n", native_syscall0(0x40000000L | 39));
	printf("native_getpid %ld\n", native_syscall0(39));
	return 0;
}
