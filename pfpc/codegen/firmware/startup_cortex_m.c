/* Minimal Cortex-M startup for QEMU's mps2/mps3 boards, shipped by pfpc with every Cortex-M build:
 * vector table, copy .data, zero .bss, enable the FPU, set up semihosting, pass the semihosting
 * command line to main(argc, argv), report main's return value to QEMU as its exit code.
 *
 * It also provides a tick counter for `pfpc run --emulate --cycles/--profile`: SysTick runs on the
 * processor clock from reset and an interrupt counts its 24-bit wraps. Under
 * `qemu-system-arm -icount shift=0` every run of the same code gives the same count. And a stack
 * high-water mark for the same runs: the stack below the caller is painted with a pattern before
 * the call, and the painted words overwritten after it are counted (libm frames included). */
#include <stdint.h>

extern uint32_t __etext, __data_start__, __data_end__, __bss_start__, __bss_end__, __StackTop;
extern int main(int argc, char** argv);
extern void initialise_monitor_handles(void);
extern void exit(int);

void Reset_Handler(void);
void Default_Handler(void);
void SysTick_Handler(void);
void _init(void) {}
void _fini(void) {}

__attribute__((section(".isr_vector"), used)) void (*const vector_table[16])(void) = {
    (void (*)(void))(&__StackTop), Reset_Handler, Default_Handler, Default_Handler, Default_Handler,
    Default_Handler, Default_Handler, 0, 0, 0, 0, Default_Handler, Default_Handler, 0, Default_Handler,
    SysTick_Handler,
};

#define SYSTICK_CSR (*(volatile uint32_t*)0xE000E010)
#define SYSTICK_RVR (*(volatile uint32_t*)0xE000E014)
#define SYSTICK_CVR (*(volatile uint32_t*)0xE000E018)
#define SYSTICK_PERIOD 0x1000000u /* 24-bit down-counter */

static volatile uint32_t systick_wraps;

void SysTick_Handler(void) { systick_wraps++; }

void Default_Handler(void) {
  for (;;) {
  }
}

/* SysTick ticks since reset (wraps counted by the interrupt): processor-clock cycles on a board;
 * under QEMU -icount shift=0 one tick per (1e9 / board clock) instructions, which `pfpc run`
 * converts to instructions. */
uint64_t pfpc_systick_ticks(void) {
  uint32_t wraps, value;
  do {
    wraps = systick_wraps;
    value = SYSTICK_CVR;
  } while (wraps != systick_wraps);
  return (uint64_t)wraps * SYSTICK_PERIOD + (SYSTICK_PERIOD - 1u - value);
}

#define STACK_PATTERN 0x5AFEC0DEu
#define STACK_WINDOW_WORDS (64u * 1024u / 4u) /* far more than any pfpc model needs */
static uint32_t* stack_painted_top;

/* Paint the STACK_WINDOW_WORDS words below the caller's stack pointer. A leaf without locals:
 * its stack pointer is the caller's. */
__attribute__((noinline)) void pfpc_stack_paint(void) {
  uint32_t* sp;
  uint32_t index;
  __asm__ volatile("mov %0, sp" : "=r"(sp));
  stack_painted_top = sp;
  for (index = 1; index <= STACK_WINDOW_WORDS; ++index) sp[-(int32_t)index] = STACK_PATTERN;
}

/* Bytes of stack below the painted top written since pfpc_stack_paint(): the peak stack of the
 * calls made in between (with the exception frame of a SysTick interrupt, if one hit the peak). */
uint32_t pfpc_stack_used(void) {
  uint32_t index = STACK_WINDOW_WORDS;
  while (index > 0 && stack_painted_top[-(int32_t)index] == STACK_PATTERN) index--;
  return index * 4u;
}

static int semihost(int operation, void* argument) {
  register int r0 __asm__("r0") = operation;
  register void* r1 __asm__("r1") = argument;
  __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
  return r0;
}

/* argv from the semihosting command line (SYS_GET_CMDLINE), split at spaces. */
static int command_line(char** argv, int max_args) {
  static char buffer[512];
  struct {
    char* text;
    int length;
  } block = {buffer, (int)sizeof buffer - 1};
  int argc = 0;
  char* cursor = buffer;
  if (semihost(0x15, &block) != 0) return 0;
  buffer[block.length] = '\0';
  while (*cursor && argc < max_args) {
    while (*cursor == ' ') *cursor++ = '\0';
    if (!*cursor) break;
    argv[argc++] = cursor;
    while (*cursor && *cursor != ' ') cursor++;
  }
  return argc;
}

void Reset_Handler(void) {
  static char* argv[9];
  int argc;
  uint32_t* src = &__etext;
  uint32_t* dst = &__data_start__;
  while (dst < &__data_end__) *dst++ = *src++;
  for (dst = &__bss_start__; dst < &__bss_end__; ++dst) *dst = 0;
  /* CPACR: full access to CP10 and CP11 (the FPU) */
  *(volatile uint32_t*)0xE000ED88 |= (0xFu << 20);
  __asm__ volatile("dsb\n isb");
  SYSTICK_RVR = SYSTICK_PERIOD - 1u;
  SYSTICK_CVR = 0;
  SYSTICK_CSR = 7u; /* enable, interrupt on wrap, processor clock */
  initialise_monitor_handles();
  argc = command_line(argv, 8);
  argv[argc] = 0;
  exit(main(argc, argv));
}
