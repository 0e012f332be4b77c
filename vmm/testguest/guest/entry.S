/*
 * Entry points of the cubicle test guest.
 *
 * _start64 (load + 0x200): Linux 64-bit boot protocol. Long mode, paging
 * on, RSI = struct boot_params.
 * pvh_start (load address, announced by a XEN_ELFNOTE_PHYS32_ENTRY note):
 * PVH. 32-bit protected mode, paging off, EBX = struct hvm_start_info.
 * It builds its own identity map of the first 4 GiB and enters long mode.
 *
 * Both load the guest's own GDT (same selectors as the Linux boot GDT:
 * 0x08 code32, 0x10 code64, 0x18 data), switch to the guest stack and call
 * guest_main(info, pvh).
 */
	.section .head32, "ax"
	.code32
	.globl pvh_start
pvh_start:
	cli
	movl	%ebx, %esi
	lgdt	gdt_desc
	movl	$0x18, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	/* PML4[0] -> PDPT, PDPT[0..3] -> PD pages, PD: 2048 x 2 MiB pages. */
	movl	$pvh_pdpt + 3, pvh_pml4
	movl	$pvh_pd + 3, %eax
	movl	%eax, pvh_pdpt
	addl	$0x1000, %eax
	movl	%eax, pvh_pdpt + 8
	addl	$0x1000, %eax
	movl	%eax, pvh_pdpt + 16
	addl	$0x1000, %eax
	movl	%eax, pvh_pdpt + 24
	xorl	%ecx, %ecx
1:	movl	%ecx, %eax
	shll	$21, %eax
	orl	$0x83, %eax
	movl	%eax, pvh_pd(,%ecx,8)
	movl	%ecx, %edx
	shrl	$11, %edx
	movl	%edx, pvh_pd + 4(,%ecx,8)
	incl	%ecx
	cmpl	$2048, %ecx
	jb	1b
	movl	$pvh_pml4, %eax
	movl	%eax, %cr3
	movl	%cr4, %eax
	orl	$0x20, %eax		/* PAE */
	movl	%eax, %cr4
	movl	$0xc0000080, %ecx	/* EFER.LME */
	rdmsr
	orl	$0x100, %eax
	wrmsr
	movl	%cr0, %eax
	orl	$0x80000001, %eax	/* PG | PE */
	movl	%eax, %cr0
	ljmp	$0x10, $pvh_long

	.code64
pvh_long:
	movl	%esi, %edi		/* info = hvm_start_info */
	movl	$1, %esi		/* pvh = 1 */
	jmp	common64

	.section .head64, "ax"
	.globl _start64
_start64:
	cli
	movq	%rsi, %rdi		/* info = boot_params */
	xorl	%esi, %esi		/* pvh = 0 */
common64:
	lgdt	gdt_desc(%rip)
	movl	$0x18, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	leaq	stack_top(%rip), %rsp
	pushq	$0x10
	leaq	2f(%rip), %rax
	pushq	%rax
	lretq
2:	call	guest_main
3:	cli
	hlt
	jmp	3b

	.section .note.Xen, "a"
	.balign 4
	.long	4			/* namesz: "Xen\0" */
	.long	4			/* descsz */
	.long	18			/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz	"Xen"
	.long	pvh_start

	.section .data
	.balign 16
gdt:
	.quad	0
	.quad	0x00cf9b000000ffff	/* 0x08: 32-bit code */
	.quad	0x00af9b000000ffff	/* 0x10: 64-bit code */
	.quad	0x00cf93000000ffff	/* 0x18: data */
gdt_end:
gdt_desc:
	.word	gdt_end - gdt - 1
	.quad	gdt

	.section .bss
	.balign 4096
pvh_pml4:	.skip 4096
pvh_pdpt:	.skip 4096
pvh_pd:		.skip 4 * 4096
stack:		.skip 16384
stack_top:
